"""Scored answers during training: trainer.eval_scorer and trainer.eval_before (the default job prints both)."""

from __future__ import annotations

import json

import pytest

from ftune.errors import FtuneError
from ftune.evaluate import run_eval
from ftune.train import train

from conftest import compose_train


@pytest.fixture
def one_answer(tmp_path):
    """Every question has the answer 'yes': a tiny model learns it in a few steps, and cannot before."""
    rows = [{"instruction": "Answer the question.", "input": f"Is {i} a number?", "output": "yes"} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(path, *extra):
    return ["model=tiny_llama", "dataset=instruction", f"dataset.path={path}", "dataset.prompt_template=plain",
            "dataset.eval_fraction=0.2", "method=full", "optimizer.lr=3e-3", "scheduler=constant",
            "trainer.batch_size=8", "trainer.eval_scorer=exact_match", "trainer.eval_before=true",
            "trainer.eval_max_new_tokens=4", *extra]


def test_exact_match_before_and_after_training(one_answer, tmp_path):
    cfg = compose_train(overrides(one_answer, "trainer.max_steps=30", "trainer.log_every=30"), tmp_path / "run")
    metrics = train(cfg)
    assert metrics["eval_before/exact_match"] == 0.0 and metrics["eval_before/scored"] == 8
    assert metrics["eval/exact_match"] == 1.0 and metrics["eval/scored"] == 8
    assert metrics["eval_before/loss"] > 2 * metrics["eval/loss"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_before/exact_match" in rows[0]
    # one logging window of all 30 steps: its tokens/s counts training time only, not the evaluation before
    assert rows[1]["step"] == 30 and rows[1]["tokens_per_s"] == pytest.approx(metrics["tokens_per_s"], rel=1e-9)
    # `ftune eval` of the run scores the same split the same way
    eval_cfg = compose_eval(tmp_path / "run")
    report = run_eval(eval_cfg)
    assert report["eval/exact_match"] == metrics["eval/exact_match"]


def compose_eval(run):
    from hydra import compose, initialize_config_dir

    from ftune.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="eval", overrides=[f"run={run}", "eval.scorer=exact_match",
                                                      "eval.max_new_tokens=4"])


def test_a_resumed_run_keeps_its_before_training_scores(one_answer, tmp_path):
    base = overrides(one_answer, "trainer.save_every=2")
    first = train(compose_train(base + ["trainer.max_steps=2"], tmp_path / "run"))
    resumed = train(compose_train(base + ["trainer.max_steps=4", "resume=auto"], tmp_path / "run"))
    assert resumed["eval_before/exact_match"] == first["eval_before/exact_match"]
    assert resumed["eval_before/loss"] == first["eval_before/loss"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if "eval_before/loss" in r) == 1  # evaluated once, not again on resume


@pytest.mark.parametrize("extra, words", [
    (["trainer.eval_scorer=bleu"], "Unknown trainer.eval_scorer 'bleu'"),
    (["model=tiny_bert", "dataset=sentiment", "trainer.eval_scorer=exact_match"], "classification runs report"),
    (["model=tiny_llama", "dataset=demo_text", "dataset.eval_fraction=null", "trainer.eval_before=true"],
     "has none"),
])
def test_scoring_settings_that_cannot_work_are_refused(tmp_path, extra, words):
    with pytest.raises(FtuneError, match=words):
        train(compose_train(["model=tiny_llama", "dataset=demo_instructions", *extra], tmp_path / "run"))
