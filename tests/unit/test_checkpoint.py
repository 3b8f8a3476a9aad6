"""ftune.checkpoint in-process: atomic saves, exact restore, damaged / foreign checkpoints, safe loading."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from ftune.checkpoint import (
    CheckpointDamaged,
    CheckpointMismatch,
    LoopState,
    checkpoint_dirs,
    read_checkpoint,
    resume_from,
    save_checkpoint,
)
from ftune.errors import TrainingFailed
from ftune.methods.base import Method

IDENTITY = {"model": "tiny", "method": "stateful", "task": "causal_lm", "trainable": 36}


class Stateful(Method):
    """A method with state of its own (as AdaLoRA's importance scores)."""

    def __init__(self):
        self.counter = torch.zeros(3)

    def state_dict(self):
        return {"counter": self.counter.clone()}

    def load_state_dict(self, state):
        self.counter = state["counter"].clone()


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight.requires_grad_(False)  # a frozen tensor: not in the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    return model, opt, sched, Stateful()


def step(model, opt, sched, method):
    loss = model(torch.randn(2, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    method.counter += 1


def save(root, n, model, opt, sched, method, keep=3, **loop):
    return save_checkpoint(root, LoopState(step=n, **loop), model, opt, sched, None, method, IDENTITY, keep)


def test_resume_continues_exactly(tmp_path):
    model, opt, sched, method = make()
    for _ in range(3):
        step(model, opt, sched, method)
    save(tmp_path / "out" / "checkpoints", 3, model, opt, sched, method, epoch=1, position=2, loss_sum=1.5, loss_count=2)
    for _ in range(2):
        step(model, opt, sched, method)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2, method2 = make()  # a fresh process: the same base model, its own RNG state
    torch.manual_seed(99)
    path, loop = resume_from(tmp_path / "out", "auto", model2, opt2, sched2, None, method2, IDENTITY, say=print)
    assert path.name == "step-000003"
    assert (loop.step, loop.epoch, loop.position, loop.loss_sum, loop.loss_count) == (3, 1, 2, 1.5, 2)
    assert method2.counter.tolist() == [3.0, 3.0, 3.0]
    for _ in range(2):
        step(model2, opt2, sched2, method2)
    for a, b in zip(expected, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_states_are_restored(tmp_path):
    model, opt, sched, method = make()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save(tmp_path / "checkpoints", 1, model, opt, sched, method)
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    resume_from(tmp_path, "auto", *make()[:3], None, Stateful(), IDENTITY, say=print)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_auto_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path):
    model, opt, sched, method = make()
    root = tmp_path / "checkpoints"
    step(model, opt, sched, method)
    save(root, 2, model, opt, sched, method)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(good["0.weight"], make()[0].state_dict()["0.weight"])
    step(model, opt, sched, method)
    latest = save(root, 4, model, opt, sched, method)
    (latest / "trainable.safetensors").write_bytes((latest / "trainable.safetensors").read_bytes()[:50])
    said = []
    model2, opt2, sched2, method2 = make()
    path, loop = resume_from(tmp_path, "auto", model2, opt2, sched2, None, method2, IDENTITY, say=said.append)
    assert path.name == "step-000002" and loop.step == 2
    assert "step-000004" in said[0] and "damaged" in said[0] and "Falling back to step-000002" in said[0]
    assert all(torch.equal(good[k], v) for k, v in model2.state_dict().items())


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    model, opt, sched, method = make()
    path = save(tmp_path / "checkpoints", 2, model, opt, sched, method)
    (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointDamaged, match="Every checkpoint"):
        resume_from(tmp_path, "auto", *make()[:3], None, Stateful(), IDENTITY, say=print)
    with pytest.raises(CheckpointDamaged, match="damaged or incomplete"):
        resume_from(tmp_path, str(path), *make()[:3], None, Stateful(), IDENTITY, say=print)


def test_no_checkpoint_starts_from_zero(tmp_path):
    said = []
    path, loop = resume_from(tmp_path, "auto", *make()[:3], None, Stateful(), IDENTITY, say=said.append)
    assert path is None and loop == LoopState() and "starting from step 0" in said[0]


@pytest.mark.parametrize("change", ["identity", "shape"])
def test_a_checkpoint_of_another_run_is_refused_and_nothing_is_loaded(tmp_path, change):
    model, opt, sched, method = make()
    save(tmp_path / "checkpoints", 2, model, opt, sched, method)
    if change == "identity":
        model2, opt2, sched2, _ = make(seed=5)
        identity = {**IDENTITY, "model": "other"}
    else:
        torch.manual_seed(5)
        model2 = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4))
        model2[1].weight.requires_grad_(False)
        opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad])
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
        identity = IDENTITY
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(CheckpointMismatch, match="belongs to a different run"):
        resume_from(tmp_path, "auto", model2, opt2, sched2, None, Stateful(), identity, say=print)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())


def test_saves_are_atomic_pruned_by_step_number_and_skip_leftovers(tmp_path):
    model, opt, sched, method = make()
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000007").mkdir(parents=True)  # a save killed half-way
    for n in (999_998, 999_999, 1_000_000):
        save(root, n, model, opt, sched, method, keep=2)
    assert [p.name for p in checkpoint_dirs(root)] == ["step-999999", "step-1000000"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    again = save(root, 1_000_000, model, opt, sched, method, keep=2)  # the same step twice: replaced whole
    assert read_checkpoint(again).loop.step == 1_000_000


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt, sched, method = make()
    save(tmp_path / "checkpoints", 1, model, opt, sched, method)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingFailed, match="NaN/inf at step 2"):
        save(tmp_path / "checkpoints", 2, model, opt, sched, method)
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-000001"]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/ftune-checkpoint-pickle-ran"


def test_a_pickle_that_runs_code_is_not_executed(tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    model, opt, sched, method = make()
    path = save(tmp_path / "checkpoints", 2, model, opt, sched, method)
    torch.save({"state": {}, "param_groups": [], "x": Evil()}, path / "optimizer.pt")
    import json

    state = json.loads((path / "state.json").read_text())
    state["sizes"]["optimizer.pt"] = (path / "optimizer.pt").stat().st_size
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointDamaged, match="damaged"):
        read_checkpoint(path)
    assert not os.path.exists(MARKER)


def test_resuming_with_another_learning_rate_warns_and_keeps_the_checkpoints(tmp_path):
    model, opt, sched, method = make()
    step(model, opt, sched, method)
    save(tmp_path / "checkpoints", 1, model, opt, sched, method)
    model2, _, _, method2 = make()
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=0.5)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    said = []
    resume_from(tmp_path, "auto", model2, opt2, sched2, None, method2, IDENTITY, say=said.append)
    assert len(said) == 1 and "learning rate 0.5" in said[0] and "trained with 0.1" in said[0]
    assert opt2.param_groups[0]["initial_lr"] == 0.1 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 / 2)
    said.clear()  # the same rate: nothing to say
    resume_from(tmp_path, "auto", *make()[:3], None, Stateful(), IDENTITY, say=said.append)
    assert said == []
