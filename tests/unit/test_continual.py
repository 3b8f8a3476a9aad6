"""strategy=continual: the matrix metrics on a given matrix, EWC's Fisher and penalty against a hand computation,
replay's ratio and buffers, two tiny tasks where EWC and replay forget less than naive fine-tuning, per-task
adapters chosen by task at eval, kill and resume in both stages, bad inputs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ftune.errors import FtuneError
from ftune.strategies import build_strategy
from ftune.strategies.continual import (
    Continual,
    continual_metrics,
    ewc_penalty,
    fisher_diagonal,
    merge_online,
    replay_counts,
    update_buffer,
)
from ftune.train import train

COLOURS, ANIMALS, FILL = ["red", "blue", "green", "yellow"], ["cat", "dog", "fish", "bird"], ["the", "a", "big", "old"]


def write_task(root: Path, name: str, keys: list[str], labels: list[str], n: int = 64, n_eval: int = 24,
               noise: list[str] = ()) -> dict:
    """A task whose label is decided by its first word (one of ``keys``) among filler words (and a random word of
    ``noise``, which does not decide the label); balanced."""
    rng = random.Random(name)
    files = {}
    for split, m in (("train", n), ("dev", n_eval)):
        rows = []
        for i in range(m):
            words = [rng.choice(FILL) for _ in range(3)] + ([rng.choice(noise)] if noise else [])
            rng.shuffle(words)
            words.insert(0, keys[i % len(keys)])
            rows.append(f"{' '.join(words)},{labels[i % len(keys) % len(labels)]}")
        rng.shuffle(rows)
        files[split] = root / f"{name}_{split}.csv"
        files[split].write_text("text,label\n" + "\n".join(rows) + "\n")
    return {"name": name, "dataset": {"path": str(files["train"]), "eval_path": str(files["dev"])}}


def stages_arg(entries: list[dict]) -> str:
    """Hydra's list syntax, as a user types it."""
    return "strategy.stages=[" + ", ".join(
        f"{{name: {e['name']}, dataset: {{" + ", ".join(f"{k}: {v}" for k, v in e["dataset"].items()) + "}}"
        for e in entries) + "]"


def two_tasks(root: Path, shared: bool = True) -> str:
    """Colours then animals (whose rows hold a colour that does not decide their label): the same labels (one
    head), or their own labels (a head each)."""
    root.mkdir(parents=True, exist_ok=True)
    a = write_task(root, "colours", COLOURS, ["warm", "cold"])
    b = write_task(root, "animals", ANIMALS, ["cold", "warm"] if shared else ["pet", "wild"], noise=COLOURS)
    return stages_arg([a, b])


BERT = ["model=tiny_bert", "dataset=classification", "strategy=continual", "trainer.max_length=16",
        "trainer.batch_size=8", "trainer.device=cpu"]


# --- definitions on given numbers ----------------------------------------------------------------------
def test_matrix_metrics_follow_their_definitions():
    r = [[0.9], [0.6, 0.8], [0.7, 0.5, 0.95]]
    m = continual_metrics(r)
    assert m["average_accuracy"] == pytest.approx((0.7 + 0.5 + 0.95) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.7 - 0.9) + (0.5 - 0.8)) / 2)  # Lopez-Paz & Ranzato
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.8 - 0.5)) / 2)  # Chaudhry: max over l < T-1
    # forgetting takes the best earlier score, BWT the score right after training: they differ here
    r = [[0.5], [0.9, 0.7], [0.6, 0.7, 0.8]]
    m = continual_metrics(r)
    assert m["backward_transfer"] == pytest.approx(((0.6 - 0.5) + (0.7 - 0.7)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.7 - 0.7)) / 2)


class Softmax(nn.Module):
    """Logistic regression on one-hot input ids: logits = W x + b, x = one_hot(input_ids[0])."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -1.0, 0.2], [0.1, 0.3, -0.4]]))
            self.lin.bias.copy_(torch.tensor([0.05, -0.1]))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.lin(nn.functional.one_hot(input_ids[:, 0], 3).float()))


def test_fisher_is_the_mean_of_per_example_squared_gradients_and_the_penalty_its_formula():
    from ftune.data.collate import Collator

    model = Softmax()
    examples = [{"input_ids": [0], "labels": 0}, {"input_ids": [1], "labels": 1}, {"input_ids": [2], "labels": 1},
                {"input_ids": [1], "labels": 0}]
    params = dict(model.named_parameters())
    fisher = fisher_diagonal(model, examples, Collator(0, "seq_cls"), "seq_cls", torch.device("cpu"), params)
    # by hand: d(-log p_y)/dW = (p - onehot(y)) x^T, d/db = p - onehot(y); squared, then averaged
    w, b = model.lin.weight.detach(), model.lin.bias.detach()
    fw, fb = torch.zeros(2, 3), torch.zeros(2)
    for e in examples:
        x = torch.zeros(3)
        x[e["input_ids"][0]] = 1
        g = torch.softmax(w @ x + b, -1) - torch.eye(2)[e["labels"]]
        fw += torch.outer(g, x) ** 2
        fb += g ** 2
    assert torch.allclose(fisher["lin.weight"], fw / 4, atol=1e-7) and torch.allclose(fisher["lin.bias"], fb / 4)
    # not the squared gradient of the batch's mean loss (what common libraries compute)
    batch_grad = sum((torch.softmax(w[:, e["input_ids"][0]] + b, -1) - torch.eye(2)[e["labels"]]) for e in examples) / 4
    assert not torch.allclose(fisher["lin.bias"], batch_grad ** 2)
    # penalty: (lambda / 2) * sum F (theta - theta*)^2
    theta = {n: p.detach().clone() for n, p in params.items()}
    moved = {"lin.weight": theta["lin.weight"] + 0.1, "lin.bias": theta["lin.bias"] - 0.2}
    hand = 0.5 * 3.0 * ((fw / 4 * 0.01).sum() + (fb / 4 * 0.04).sum())
    assert float(ewc_penalty(moved, [{"fisher": fisher, "theta": theta}], 3.0)) == pytest.approx(float(hand), rel=1e-5)
    # two tasks (offline EWC): two terms; online EWC: F <- gamma F_old + F_new, theta* the latest
    assert float(ewc_penalty(moved, [{"fisher": fisher, "theta": theta}] * 2, 3.0)) == pytest.approx(2 * float(hand), rel=1e-5)
    merged = merge_online({"fisher": fisher, "theta": theta}, fisher, moved, 0.5)
    assert torch.allclose(merged["fisher"]["lin.weight"], 1.5 * fisher["lin.weight"])
    assert torch.equal(merged["theta"]["lin.bias"], moved["lin.bias"])


def continual(**settings) -> Continual:
    stages = [{"name": "a", "dataset": {}}, {"name": "b", "dataset": {}}]
    return build_strategy({"name": "continual", "stages": stages, **settings})


def test_the_penalty_enters_the_loss_once_per_step_whatever_the_micro_batches():
    strategy = continual(ewc_lambda=2.0)
    strategy.task = "seq_cls"
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    strategy.ewc_params = {"p": p}
    strategy.fisher_terms = [{"fisher": {"p": torch.tensor([0.5, 1.0])}, "theta": {"p": torch.tensor([0.0, 1.0])}}]
    penalty = 0.5 * 2.0 * (0.5 * 1 + 1.0 * 1)
    task_sums = [torch.tensor(3.0), torch.tensor(1.0)]  # two micro-batches: 2 and 4 examples (6 in the window)
    losses = [strategy.loss(None, {"labels": torch.zeros(n)}, None, s, 6, 0) for s, n in zip(task_sums, (2, 4))]
    assert float(sum(losses).detach()) == pytest.approx(4.0 / 6 + penalty)
    sum(losses).backward()
    assert torch.allclose(p.grad, 2.0 * torch.tensor([0.5, 1.0]) * torch.tensor([1.0, 1.0]))


# --- replay --------------------------------------------------------------------------------------------
def test_replay_mixes_earlier_examples_at_the_configured_ratio():
    assert replay_counts([4] * 10, 0.2) == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    for ratio in (0.1, 0.25, 0.5):
        sizes = [8] * 37 + [3]
        given = sum(replay_counts(sizes, ratio))
        assert abs(given / (given + sum(sizes)) - ratio) < 1 / sum(sizes)
    strategy = continual(replay_ratio=0.25)
    strategy.sctx = SimpleNamespace(seed=0)
    strategy.replay_groups = {"x": [{"input_ids": [1]}] * 5, "y": [{"input_ids": [2]}] * 7}
    own = [list(range(i, i + 6)) for i in range(0, 60, 6)]
    epoch = strategy.batches(own, 0)
    assert [f["train"] for f in epoch] == own
    replayed = sum(len(v) for f in epoch for k, v in f.items() if k.startswith("replay/"))
    assert replayed / (replayed + 60) == pytest.approx(0.25, abs=0.01)
    assert strategy.batches(own, 0) == epoch and strategy.batches(own, 1) != epoch  # a pure function of the epoch
    assert {k for f in epoch for k in f} == {"train", "replay/x", "replay/y"}


def test_reservoir_and_balanced_buffers():
    a = [{"input_ids": [i]} for i in range(100)]
    b = [{"input_ids": [1000 + i]} for i in range(20)]
    res = update_buffer(update_buffer({}, a, 0, 30, "reservoir", 0), b, 1, 30, "reservoir", 0)
    assert len(res["examples"]) == 30 and res["seen"] == 120
    from_b = [sum(e["task"] == 1 for e in update_buffer(update_buffer({}, a, 0, 30, "reservoir", s), b, 1, 30,
                                                          "reservoir", s)["examples"]) for s in range(200)]
    assert sum(from_b) / len(from_b) == pytest.approx(30 * 20 / 120, rel=0.1)  # each example kept w.p. size/seen
    bal = update_buffer(update_buffer({}, a, 0, 30, "balanced", 0), b, 1, 30, "balanced", 0)
    assert [sum(e["task"] == t for e in bal["examples"]) for t in (0, 1)] == [15, 15]
    assert len({tuple(e["input_ids"]) for e in bal["examples"]}) == 30


# --- on tiny tasks, through the one training loop --------------------------------------------------------
def matrix_of(out: Path) -> list[list[float | None]]:
    return json.loads((out / "continual.json").read_text())["matrix"]


def test_ewc_and_replay_each_forget_less_than_naive_fine_tuning(make_cfg, tmp_path):
    """Colours then animals with one head (the same labels): naive fine-tuning on animals forgets colours."""
    stages = two_tasks(tmp_path / "data")
    args = [*BERT, stages, "method=full", "optimizer.lr=1e-2", "trainer.max_steps=60"]
    runs = {"naive": [], "ewc": ["strategy.ewc_lambda=1e5", "strategy.fisher_samples=24"],
            "replay": ["strategy.replay_ratio=0.3", "strategy.replay_size=24"]}
    final = {}
    for name, extra in runs.items():
        train(make_cfg(*args, *extra, out=name))
        r = matrix_of(tmp_path / name)
        assert r[0][0] == 1.0 and r[1][1] == 1.0 and r[0][1] is None  # both tasks learnt
        final[name] = r[1][0]
        report = json.loads((tmp_path / name / "continual.json").read_text())
        assert report["forgetting"] == pytest.approx(r[0][0] - r[1][0])
    assert final["naive"] <= 0.25  # forgotten
    assert final["ewc"] >= final["naive"] + 0.25 and final["replay"] >= final["naive"] + 0.25
    metrics = json.loads((tmp_path / "replay" / "metrics.json").read_text())
    assert metrics["continual/forgetting"] < json.loads((tmp_path / "naive" / "metrics.json").read_text())[
        "continual/forgetting"]
    assert (tmp_path / "replay" / "continual.png").stat().st_size > 1000
    assert "## Continual learning" in (tmp_path / "replay" / "README.md").read_text()


def test_per_task_adapters_evaluate_each_task_with_its_own_adapter(make_cfg, tmp_path, monkeypatch):
    """A LoRA adapter per task (own labels, own head): task j is scored with adapter j, so its score after the
    last stage is the one it had after its own stage."""
    from safetensors.torch import load_file

    import ftune.evaluate as evaluate

    used = []
    real = evaluate.evaluate_examples

    def spy(model, examples, *args, **kwargs):
        if hasattr(model, "active_adapter") and len(examples) == 24:
            lora = {n: p.detach().clone() for n, p in model.named_parameters()
                    if "lora_A" in n and f".{model.active_adapter}." in n}
            used.append((model.active_adapter, lora))
        return real(model, examples, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_examples", spy)
    train(make_cfg(*BERT, two_tasks(tmp_path / "data", shared=False), "method=lora", "optimizer.lr=1e-2",
                   "trainer.max_steps=6", "strategy.per_task_adapters=true"))
    r = matrix_of(tmp_path / "run")
    assert r[1][0] == r[0][0]  # isolation: nothing of task 0's adapter or head changed
    # the scoring of stage 1: colours with adapter task_0 (stage colours' trained weights), animals with its own
    assert [a for a, _ in used[-2:]] == ["task_0", "default"]
    saved = load_file(str(tmp_path / "run/stages/colours/adapter/adapter_model.safetensors"))
    a_weights = {n.replace(".task_0.", "."): v for n, v in used[-2][1].items()}
    assert len(a_weights) == 4 and all(torch.equal(v, saved[n]) for n, v in a_weights.items())
    final = load_file(str(tmp_path / "run/adapter/adapter_model.safetensors"))
    assert any(not torch.equal(final[n], saved[n]) for n in saved if "lora_A" in n)  # task 1 trained its own


def test_kill_and_resume_in_either_stage_reproduce_the_uninterrupted_run(make_cfg, tmp_path, monkeypatch):
    """Killed (SIGTERM, as from a scheduler) in the first stage, then in the second; each time resume=auto.
    Stage index, Fisher, replay buffer and the replay draws are restored: the result equals one run's."""
    from safetensors.torch import load_file

    from ftune.errors import TrainingInterrupted

    args = [*BERT, two_tasks(tmp_path / "data"), "method=lora", "optimizer.lr=1e-2", "trainer.max_steps=4",
            "strategy.ewc_lambda=10", "strategy.fisher_samples=6", "strategy.replay_ratio=0.25",
            "strategy.replay_size=8", "trainer.save_every=10"]
    train(make_cfg(*args, out="whole"))
    kill_at: list[tuple[int, int]] = [(0, 2), (1, 3)]  # (stage, step)
    real_after_step = Continual.after_step

    def after_step(self, model, step):
        real_after_step(self, model, step)
        if kill_at and kill_at[0] == (self.index, step + 1):
            kill_at.pop(0)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Continual, "after_step", after_step)
    with pytest.raises(TrainingInterrupted, match="at step 2"):
        train(make_cfg(*args, out="part"))
    assert not (tmp_path / "part/stages/colours/continual_state.pt").exists()
    with pytest.raises(TrainingInterrupted, match="at step 3"):
        train(make_cfg(*args, "resume=auto", out="part"))
    state = (tmp_path / "part/stages/colours/continual_state.pt").stat().st_mtime_ns
    train(make_cfg(*args, "resume=auto", out="part"))
    assert (tmp_path / "part/stages/colours/continual_state.pt").stat().st_mtime_ns == state  # not redone
    assert matrix_of(tmp_path / "part") == matrix_of(tmp_path / "whole")
    whole, part = (torch.load(tmp_path / d / "stages/colours/continual_state.pt", weights_only=True)
                   for d in ("whole", "part"))
    assert whole["buffer"] == part["buffer"]
    assert all(torch.equal(whole["ewc"][0]["fisher"][n], part["ewc"][0]["fisher"][n]) for n in whole["ewc"][0]["fisher"])
    a, b = (load_file(str(tmp_path / d / "adapter/adapter_model.safetensors")) for d in ("whole", "part"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    rows = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in map(json.loads, (tmp_path / d / "metrics.jsonl")
             .read_text().splitlines()) if "loss" in r] for d in ("whole", "part")]
    assert rows[0] == rows[1] and any("strategy/replay_loss" in r and "strategy/ewc_penalty" in r for r in rows[0])
    shutil.rmtree(tmp_path / "part/checkpoints")  # the last stage anew, with another lambda: the first is not reused
    with pytest.raises(FtuneError, match=r"finished with other settings than this run's \(strategy\.ewc_lambda\)"):
        train(make_cfg(*args, "resume=auto", "strategy.ewc_lambda=20", out="part"))


def error_of(make_cfg, *overrides: str) -> str:
    with pytest.raises(FtuneError) as err:
        train(make_cfg(*overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_continual_inputs_get_one_paragraph(make_cfg, tmp_path):
    stages = two_tasks(tmp_path / "data")
    assert "at least two stages" in error_of(make_cfg, *BERT)
    assert "must be {name: <task>" in error_of(make_cfg, *BERT, "strategy.stages=[a, b]")
    assert "used twice" in error_of(make_cfg, *BERT, "strategy.stages=[{name: a}, {name: a}]")
    assert "unknown dataset keys colum" in error_of(
        make_cfg, *BERT, "strategy.stages=[{name: a, dataset: {colum: x}}, {name: b}]")
    assert "replay_policy must be reservoir or balanced" in error_of(make_cfg, *BERT, stages,
                                                                     "strategy.replay_policy=fifo")
    assert "have nothing to protect" in error_of(make_cfg, *BERT, stages, "strategy.per_task_adapters=true",
                                                 "strategy.ewc_lambda=1")
    assert "strategy.replay_ratio must be" in error_of(make_cfg, *BERT, stages, "strategy.replay_ratio=1")
    mixed = stages.replace("{name: animals, dataset: {", "{name: animals, dataset: {format: instruction, ")
    assert "mix tasks" in error_of(make_cfg, *BERT, mixed)
    full = error_of(make_cfg, *BERT, stages, "method=full", "strategy.per_task_adapters=true")
    assert "method=lora" in full
    no_eval = error_of(make_cfg, *BERT, "strategy.stages=[{name: a, dataset: {path: x.csv, eval_fraction: null}}, "
                                        "{name: b, dataset: {path: y.csv}}]")
    assert "has no eval split" in no_eval
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
