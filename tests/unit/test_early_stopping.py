"""trainer.early_stopping_patience, metric_for_best and keep_best on real tiny runs, with resume."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.config import TrainerConfig
from ftune.early_stopping import best_metric_key, check_best_settings, greater_is_better
from ftune.errors import FtuneError
from ftune.outputs import read_metrics
from ftune.train import train

from conftest import compose_train

# LoRA at lr 0.3 on the tiny Llama: eval/loss improves up to step 6, then gets worse (steps 8 and 10),
# so patience 2 stops at step 10 of 16. Checkpoints at every eval, all kept, to compare weights with.
DIVERGING = ["model=tiny_llama", "dataset=demo_instructions", "dataset.max_eval_samples=8", "scheduler=constant",
             "optimizer.lr=0.3", "trainer.max_steps=16", "trainer.eval_every=2", "trainer.save_every=2",
             "trainer.keep_checkpoints=20", "trainer.early_stopping_patience=2", "trainer.keep_best=true"]


def saved_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def checkpoint_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable tensors, named as peft saves them (without the adapter name)."""
    tensors = load_file(str(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))
    return {name.replace(".modules_to_save.default", "").replace(".default", ""): t for name, t in tensors.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


def expected_stop(evals: list[tuple[int, float]], patience: int, greater: bool) -> tuple[int, int | None]:
    """(best step, step where `patience` evaluations in a row did not improve) of a list of (step, value)."""
    best_step, best, bad = None, None, 0
    for step, value in evals:
        if best is None or (value > best if greater else value < best):
            best_step, best, bad = step, value, 0
        else:
            bad += 1
            if bad >= patience:
                return best_step, step
    return best_step, None


@pytest.fixture(scope="module")
def diverging(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("early") / "run"
    buf = io.StringIO()
    with redirect_stdout(buf):
        metrics = train(compose_train(DIVERGING, out))
    return out, metrics, buf.getvalue()


def test_early_stopping_stops_after_the_patience_and_saves_the_best_weights(diverging):
    out, metrics, console = diverging
    evals = [(r["step"], r["eval/loss"]) for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    best_step, stop = expected_stop(evals, patience=2, greater=False)
    assert stop is not None and stop < 16 and best_step < stop, evals  # the trajectory this test relies on
    assert metrics["stopped_early_at_step"] == stop == metrics["train_steps"]
    assert (metrics["best_metric"], metrics["best_step"], metrics["weights_from_step"]) == ("eval/loss", best_step,
                                                                                            best_step)
    assert metrics["best_value"] == dict(evals)[best_step]
    assert [s for s, _ in evals] == list(range(2, stop + 1, 2))  # no evaluation after the stop, none twice
    # the saved adapter is the best step's checkpoint, and metrics.json describes it
    assert_same(saved_adapter(out), checkpoint_weights(out, best_step))
    # checkpoints after the best step carry its weights (best.safetensors); the best step's own does not need to
    ckpts = out / "checkpoints"
    assert not (ckpts / f"step-{best_step:06d}/best.safetensors").exists()
    assert_same(load_file(str(ckpts / f"step-{stop:06d}/best.safetensors")),
                load_file(str(ckpts / f"step-{best_step:06d}/trainable.safetensors")))
    assert metrics["eval/loss"] == pytest.approx(dict(evals)[best_step], abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["stopped_early_at_step"] == stop
    assert "early stopping" in console and f"stops at step {stop} of 16" in console
    assert f"weights are those of step {best_step}" in console


def test_a_run_resumed_between_the_best_step_and_the_stop_ends_the_same(diverging, tmp_path):
    out, metrics, _ = diverging
    middle = metrics["best_step"] + 2  # one evaluation without improvement already counted
    assert middle < metrics["stopped_early_at_step"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / f"step-{middle:06d}", resumed / "checkpoints" / f"step-{middle:06d}")
    again = train(compose_train([*DIVERGING, "resume=auto"], resumed))
    for key in ("stopped_early_at_step", "best_step", "best_value", "weights_from_step", "eval/loss"):
        assert again[key] == metrics[key], key
    assert_same(saved_adapter(resumed), saved_adapter(out))


def test_keep_best_with_a_greater_is_better_metric(tmp_path):
    """Classification: eval/accuracy reaches 1.0 at some step; the saved weights are that step's, not the last."""
    words = ["the", "a", "movie", "film", "was", "really", "quite", "and", "it", "plot"]
    rows = [{"text": " ".join([*words[i % 7:i % 7 + 4], ["awful", "great"][i % 2]]), "label": ["neg", "pos"][i % 2]}
            for i in range(96)]
    for name, part in (("train.jsonl", rows[:64]), ("eval.jsonl", rows[64:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    metrics = train(compose_train([
        "model=tiny_bert", "dataset=classification", f"dataset.path={tmp_path / 'train.jsonl'}",
        f"dataset.eval_path={tmp_path / 'eval.jsonl'}", "optimizer.lr=0.05", "scheduler=constant",
        "trainer.batch_size=8", "trainer.max_steps=20", "trainer.eval_every=2", "trainer.save_every=2",
        "trainer.keep_checkpoints=20", "trainer.keep_best=true", "trainer.metric_for_best=accuracy"], out))
    evals = [(r["step"], r["eval/accuracy"]) for r in read_metrics(out / "metrics.jsonl") if "eval/accuracy" in r]
    best_step, _ = expected_stop(evals, patience=99, greater=True)
    values = [v for _, v in evals]
    assert max(values) > values[0] and best_step not in (evals[0][0], 20), evals  # direction and keep_best matter
    assert (metrics["best_metric"], metrics["best_step"], metrics["weights_from_step"]) == ("eval/accuracy",
                                                                                            best_step, best_step)
    assert metrics["eval/accuracy"] == max(values) and "stopped_early_at_step" not in metrics
    assert_same(saved_adapter(out), checkpoint_weights(out, best_step))  # LoRA and the classification head


def test_metric_names_and_directions():
    assert best_metric_key("loss") == best_metric_key("eval_loss") == best_metric_key("eval/loss") == "eval/loss"
    assert not greater_is_better(TrainerConfig(metric_for_best="eval/perplexity"))
    assert greater_is_better(TrainerConfig(metric_for_best="accuracy"))
    assert greater_is_better(TrainerConfig(metric_for_best="eval/exact_match"))
    assert greater_is_better(TrainerConfig(metric_for_best="eval/loss", greater_is_better=True))


@pytest.mark.parametrize("settings,task,has_eval,words", [
    ({"early_stopping_patience": 3}, "causal_lm", True, ["eval_every is null", "trainer.eval_every="]),
    ({"keep_best": True}, "seq_cls", True, ["trainer.keep_best", "eval_every"]),
    ({"early_stopping_patience": 3, "eval_every": 10}, "causal_lm", False, ["no", "dataset.eval_fraction"]),
    ({"metric_for_best": "eval/acuracy"}, "seq_cls", True, ["Unknown trainer.metric_for_best", "eval/accuracy"]),
    ({"metric_for_best": "accuracy"}, "causal_lm", True, ["eval/loss, eval/perplexity"]),
    ({"metric_for_best": "exact_match"}, "causal_lm", True, ["trainer.eval_scorer=exact_match"]),
])
def test_settings_that_cannot_work_are_refused_in_one_paragraph(settings, task, has_eval, words):
    with pytest.raises(FtuneError) as err:
        check_best_settings(TrainerConfig(**settings), task, has_eval)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_a_scored_metric_is_accepted_with_its_scorer():
    check_best_settings(TrainerConfig(metric_for_best="exact_match", eval_scorer="exact_match",
                                      early_stopping_patience=2, eval_every=5), "causal_lm", True)


def test_stopping_early_with_a_scorer_scores_once_and_logs_no_evaluation_twice(diverging, tmp_path):
    """trainer.eval_scorer scores the final evaluation only: at the stop step just its scores are added."""
    out, metrics, _ = diverging
    scored = tmp_path / "scored"
    again = train(compose_train([*DIVERGING, "trainer.eval_scorer=exact_match", "trainer.eval_max_new_tokens=2",
                                 "trainer.save_every=null"], scored))
    stop = metrics["stopped_early_at_step"]
    assert (again["stopped_early_at_step"], again["best_step"]) == (stop, metrics["best_step"])
    at_stop = [r for r in read_metrics(scored / "metrics.jsonl") if r["step"] == stop and "loss" not in r]
    assert [sorted(r) for r in at_stop] == [["eval/examples", "eval/loss", "eval/perplexity", "step"],
                                           ["eval/exact_match", "eval/scored", "step"]]
    assert "eval/exact_match" in again and again["eval/loss"] == metrics["eval/loss"]
