"""Gradual unfreezing (ULMFiT): which parameters train at each step, their learning rates, resume.

Real runs of the one training loop on tiny models with 4 blocks; a spy on the method's after_step
hook sees every step's trainable set and weights (it runs after optimizer.step, before the stage
moves on). The expectations are written from the schedule's definition, not from ftune's code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.checkpoint import checkpoint_dirs
from ftune.config import check_settings, validate_group
from ftune.errors import FtuneError
from ftune.methods.base import build_method
from ftune.outputs import read_metrics
from ftune.train import finish, setup, train, train_loop

L, EVERY, DECAY = 4, 2, 2.6
LLAMA = ["model=tiny_llama", "dataset=demo_instructions", f"model.config.num_hidden_layers={L}",
         "trainer.batch_size=2", "trainer.max_length=64", "dataset.eval_fraction=null", "dataset.max_samples=16"]


def gradual(method: str = "freeze", every: int = EVERY) -> list[str]:
    return [f"method={method}", "method.schedule=gradual", f"method.unfreeze_every={every}", f"method.lr_decay={DECAY}"]


def block_of(name: str) -> int | None:
    """The block index of a parameter name (model.layers.3.… / encoder.layer.3.…), None outside the blocks."""
    for marker in (".layers.", ".layer."):
        if marker in name:
            return int(name.split(marker, 1)[1].split(".", 1)[0])
    return None


def record_steps(run) -> list[dict]:
    """Spy on after_step: per step, the parameters that required grad during it and every weight after it."""
    steps, method = [], run.method
    hook = method.after_step

    def spy(model, step):
        steps.append({"step": step, "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
                      "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                      "state_steps": {n: int(run.optimizer.state[p]["step"]) for n, p in model.named_parameters()
                                      if p in run.optimizer.state}})
        hook(model, step)

    method.after_step = spy
    return steps


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in after if not torch.equal(before[n], after[n])}


def test_freeze_gradual_trains_exactly_the_scheduled_blocks(make_cfg):
    """Blocks 3, then 2-3, then 1-3, ... train; the others do not move, even under weight decay."""
    run = setup(make_cfg(*LLAMA, *gradual(), "trainer.max_steps=7", "optimizer.weight_decay=0.1",
                         "scheduler=constant"))
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    steps = record_steps(run)
    train_loop(run)
    before = start
    for rec in steps:
        lowest = max(0, L - 1 - rec["step"] // EVERY)  # the lowest trainable block during this step
        expected = {n for n in start if block_of(n) is not None and block_of(n) >= lowest or n == "model.norm.weight"}
        assert rec["trainable"] == expected, rec["step"]
        assert changed(before, rec["weights"]) == expected, rec["step"]
        before = rec["weights"]
    rows = [r for r in read_metrics(run.out / "metrics.jsonl") if "loss" in r]
    assert [r["unfrozen_blocks"] for r in rows] == [1, 1, 2, 2, 3, 3, 4]


def test_lora_gradual_adds_each_blocks_adapters_with_a_fresh_optimizer_state(make_cfg):
    run = setup(make_cfg(*LLAMA, *gradual("lora", every=1), "trainer.max_steps=4", "scheduler=constant"))
    lora = {n for n, _ in run.model.named_parameters() if "lora_" in n}
    assert {block_of(n) for n in lora} == set(range(L))
    start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    steps = record_steps(run)
    finish(run, train_loop(run))
    before = start
    for rec in steps:
        expected = {n for n in lora if block_of(n) >= L - 1 - rec["step"]}
        assert rec["trainable"] == expected
        moved = changed(before, rec["weights"])
        assert moved <= expected and {n for n in expected if "lora_B" in n} <= moved  # B gets a gradient at once
        # AdamW's state of a block starts with its first step: its step count is the steps it has trained
        assert rec["state_steps"] == {n: rec["step"] - (L - 1 - block_of(n)) + 1 for n in expected}
        before = rec["weights"]
    saved = load_file(str(run.out / "adapter" / "adapter_model.safetensors"))
    assert {block_of(n) for n in saved if "lora_" in n} == set(range(L))  # the adapter holds every block


def lr_by_block(run) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in run.optimizer.param_groups}


def test_learning_rates_fall_by_lr_decay_per_block_through_warmup_and_decay(make_cfg):
    base, warm, total = 1e-3, 2, 6  # warmup_ratio 0.34 of 6 steps: 2 steps
    run = setup(make_cfg(*LLAMA, *gradual(), f"optimizer.lr={base}", "scheduler=linear",
                         "scheduler.warmup_ratio=0.34", f"trainer.max_steps={total}"))
    groups = run.optimizer.param_groups
    assert len(groups) == L  # one group per block: a block's parameters all share one lr
    for g in groups:
        blocks = {block_of(run_name) for run_name, p in run.model.named_parameters()
                  if any(p is q for q in g["params"])} - {None}
        assert len(blocks) == 1

    seen = []
    hook = run.method.after_step

    def spy(model, step):
        seen.append(lr_by_block(run))  # the lr the scheduler set for the next step
        hook(model, step)

    run.method.after_step = spy
    train_loop(run)
    for step, lrs in enumerate(seen, start=1):  # linear warmup to the peak, then linear decay to 0
        factor = (step + 1) / (warm + 1) if step < warm else 1 - (step - warm) / (total - warm)
        for block in range(L):
            assert lrs[f"group0/block{block}"] == pytest.approx(base * factor / DECAY ** (L - 1 - block), rel=1e-9)


def test_bert_head_at_base_lr_and_embeddings_join_last_one_decay_further(make_cfg):
    """Classification on BERT: the head trains from the start at the base lr; embeddings named by
    trainable_patterns sit below block 0, so they join after it at base / decay ** L."""
    run = setup(make_cfg("model=tiny_bert", "dataset=sentiment", f"model.config.num_hidden_layers={L}",
                         *gradual(every=1), "method.trainable_patterns=[bert.embeddings.*]", "optimizer.lr=1.0",
                         "scheduler=constant", "trainer.max_steps=8"))
    lrs = lr_by_block(run)
    assert lrs["group0/block3"] == 1.0 and lrs["group0/embeddings"] == pytest.approx(DECAY ** -L)
    top = {n for g in run.optimizer.param_groups if g["name"] == "group0/block3" for n, p in
           run.model.named_parameters() if any(p is q for q in g["params"])}
    assert {"classifier.weight", "classifier.bias"} <= top

    def trainable():
        return {n for n, p in run.model.named_parameters() if p.requires_grad}

    emb = {n for n, _ in run.model.named_parameters() if n.startswith("bert.embeddings.")}
    for step in range(L + 1):
        now = trainable()
        assert {block_of(n) for n in now} - {None} == set(range(L - 1 - min(step, L - 1), L))
        assert (emb <= now) == (step == L) and not (emb & now and step < L)
        run.method.after_step(run.model, step)
    assert emb <= trainable()


def test_loraplus_groups_are_split_by_block(make_cfg):
    run = setup(make_cfg(*LLAMA, *gradual("loraplus"), "optimizer.lr=1e-3", "method.loraplus_lr_ratio=16"))
    lrs = lr_by_block(run)
    for block in range(L):
        scale = DECAY ** -(L - 1 - block)
        assert lrs[f"loraplus_A/block{block}"] == pytest.approx(1e-3 * scale)
        assert lrs[f"loraplus_B/block{block}"] == pytest.approx(16e-3 * scale)


@pytest.mark.parametrize("method", ["freeze", "lora"])
def test_resume_mid_run_reproduces_the_uninterrupted_run(make_cfg, method):
    """Resume from step 3 (two blocks trainable, the third joins at step 4) of a 7-step run."""
    args = [*LLAMA, *gradual(method), "trainer.max_steps=7", "trainer.save_every=3", "trainer.keep_checkpoints=5",
            "optimizer.weight_decay=0.1"]
    whole = make_cfg(*args, out="whole")
    train(whole)
    part = make_cfg(*args, "resume=auto", out="part")
    shutil.copytree(whole.output_dir, part.output_dir)
    for ckpt in checkpoint_dirs(f"{part.output_dir}/checkpoints")[1:]:
        shutil.rmtree(ckpt)  # as if killed between steps 3 and 6
    shutil.rmtree(f"{part.output_dir}/adapter")
    train(part)
    name = "weights.safetensors" if method == "freeze" else "adapter_model.safetensors"
    a, b = (load_file(f"{cfg.output_dir}/adapter/{name}") for cfg in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [[(r["step"], r["loss"], r["unfrozen_blocks"]) for r in read_metrics(Path(cfg.output_dir, "metrics.jsonl"))
             if "loss" in r] for cfg in (whole, part)]
    assert rows[0] == rows[1] and len(rows[0]) == 7


def settings_error(make_cfg, *overrides: str) -> str:
    cfg = make_cfg(*overrides)
    with pytest.raises(FtuneError) as err:
        method = build_method(cfg.method)
        check_settings(cfg, validate_group(cfg, "trainer"), validate_group(cfg, "dataset"), method.settings)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_unfreezing_settings_get_one_paragraph(make_cfg):
    msg = settings_error(make_cfg, *LLAMA, *gradual(), "method.lr_decay=0", "method.unfreeze_every=0")
    assert "method.lr_decay must be positive" in msg and "method.unfreeze_every must be at least 1" in msg
    msg = settings_error(make_cfg, *LLAMA, "method=lora", "method.schedule=gradually", "method.unfreeze_unit=days")
    assert "method.schedule must be none or gradual" in msg and "method.unfreeze_unit must be steps or epochs" in msg
    msg = settings_error(make_cfg, *LLAMA, "method=bitfit", "++method.schedule=gradual")
    assert "gradual unfreezing" in msg and "'bitfit' does not take it" in msg and "method=freeze" in msg


def test_gpt2_blocks_unfreeze_by_epochs(make_cfg):
    """GPT-2's blocks (transformer.h) with method.unfreeze_unit=epochs: 16 examples in batches of 2 with
    accumulation 2 are 4 optimizer steps an epoch, so the second block joins after step 4."""
    run = setup(make_cfg("model=tiny_gpt2", "dataset=demo_instructions", "model.config.n_layer=3", *gradual(every=1),
                         "method.unfreeze_unit=epochs", "trainer.batch_size=2", "trainer.grad_accum=2",
                         "trainer.max_length=64", "dataset.eval_fraction=null", "dataset.max_samples=16"))
    assert run.ctx.report["unfreezing/every_steps"] == 4

    def blocks():
        return {int(n.split(".")[2]) for n, p in run.model.named_parameters() if p.requires_grad and ".h." in n}

    for step in range(8):
        assert blocks() == ({2} if step < 4 else {1, 2}), step
        run.method.after_step(run.model, step)
    assert blocks() == {0, 1, 2}
    assert {n for n, p in run.model.named_parameters() if p.requires_grad and ".h." not in n} == {
        "transformer.ln_f.weight", "transformer.ln_f.bias"}
