"""Domain adaptation from the real CLI on tiny BERT with LoRA: `strategy=dann` and `strategy=domain_adapt`
(both stages in one command), then `ftune eval run=` on each result. The two trainings run side by side."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from omegaconf import OmegaConf

from conftest import run_cli, write_target

TINY = ["model=tiny_bert", "dataset=sentiment", "method=lora", "dataset.max_samples=12", "dataset.max_eval_samples=6",
        "trainer.batch_size=4", "trainer.max_length=32", "trainer.max_steps=3", "trainer.log_every=1",
        "trainer.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain_cli")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"the toaster {i} browned the bread evenly and quietly\n" for i in range(16)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        dann = pool.submit(run_cli, "train", *TINY, *write_target(root / "target"), f"output_dir={root / 'dann'}")
        adapt = pool.submit(run_cli, "train", *TINY, "strategy=domain_adapt", f"strategy.corpus_path={corpus}",
                            "strategy.pretrain_steps=2", f"output_dir={root / 'adapt'}")
        yield root, dann.result(), adapt.result()


def test_dann_trains_from_the_cli_and_the_run_evaluates(runs):
    root, res, _ = runs
    out = root / "dann"
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


def test_domain_adapt_runs_both_stages_in_one_command_and_the_run_evaluates(runs):
    root, _, res = runs
    out = root / "adapt"
    assert res.returncode == 0, res.stdout + res.stderr
    assert "stage pretrain: training in" in res.stdout and "method full  data domain_corpus" in res.stdout
    stage = out / "stages" / "pretrain"
    assert [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (stage / "loss.png").is_file() and (stage / "model" / "model.safetensors").is_file()
    assert not (stage / "checkpoints").exists()  # a finished stage is not resumed: its checkpoints go
    cfg = OmegaConf.load(out / "config.yaml")
    assert cfg.strategy.name == "domain_adapt" and cfg.model.path == str((stage / "model").resolve())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy/pretrain_steps"] == 2 and metrics["train_steps"] == 3
    scored = run_cli("eval", f"run={out}")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert f"{metrics['eval/accuracy']:.4f}" in scored.stdout
