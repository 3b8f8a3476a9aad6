"""`ftune train strategy=dann` from the real CLI on tiny BERT with LoRA, then `ftune eval run=` on the result."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from conftest import run_cli, write_target


def test_dann_trains_from_the_cli_and_the_run_evaluates(tmp_path):
    out = tmp_path / "dann"
    res = run_cli("train", "model=tiny_bert", "dataset=sentiment", "method=lora", "dataset.max_samples=12",
                  "dataset.max_eval_samples=6", "trainer.batch_size=4", "trainer.max_length=32", "trainer.max_steps=3",
                  "trainer.log_every=1", "trainer.progress=false", *write_target(tmp_path / "target"),
                  f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dann: target" in res.stdout and "(10 examples, unlabelled)" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["strategy/domain_accuracy"] <= 1 and 0 <= metrics["strategy/target_accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "strategy/domain_accuracy" in r] == [1, 2, 3]
    assert (out / "domain_classifier.safetensors").is_file()
    assert OmegaConf.load(out / "config.yaml").strategy.name == "dann"
    # `ftune eval run=` loads the task model as for any run (the domain classifier is not needed for it)
    scored = run_cli("eval", f"run={out}")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert f"{metrics['eval/accuracy']:.4f}" in scored.stdout
