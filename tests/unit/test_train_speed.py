"""Speed and memory options of the training loop: the causal-LM loss without a copy of the logits,
logits only at positions with a target, fused AdamW on CPU, trainer.compile. Each must give the same numbers as the plain way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ftune.data.collate import Collator
from ftune.errors import FtuneError
from ftune.evaluate import ChunkedCrossEntropy, model_inputs, task_loss
from ftune.packing import PackingCollator
from ftune.train import build_optimizer, setup, train


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook way: drop virtual-token positions, shift the logits left, sum over targets."""
    logits = logits[:, -labels.shape[1]:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("virtual", [0, 3])
def test_causal_lm_loss_and_gradient_match_shifted_logits(virtual):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    logits = torch.randn(3, 7 + virtual, 50, generator=g)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, n = task_loss(a, labels, "causal_lm")
    ref = reference_loss(b, labels)
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def lora_run(make_cfg, *overrides):
    return setup(make_cfg("model=tiny_llama", "dataset=demo_instructions", "method=lora", *overrides))


@pytest.mark.parametrize("bias,chunk", [(False, 4), (True, 3), (True, 100)])
def test_chunked_cross_entropy_equals_the_loss_of_the_whole_logits(bias, chunk):
    """Projected and scored a few rows at a time: the same summed loss, and the same gradients for
    the hidden states, the weight and the bias (all three trainable), as cross-entropy of F.linear."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(17, 6, generator=g, dtype=torch.float64)
    b = torch.randn(17, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, 17, (10,), generator=g)
    ins = [t.clone().requires_grad_() for t in (hidden, weight, *([b] if bias else []))]
    ref_ins = [t.clone().requires_grad_() for t in (hidden, weight, *([b] if bias else []))]
    loss = ChunkedCrossEntropy.apply(ins[0], ins[1], ins[2] if bias else None, targets, chunk)
    ref = F.cross_entropy(F.linear(*ref_ins).float(), targets, reduction="sum")
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    (2.5 * loss).backward()  # the incoming gradient scales every input's gradient
    (2.5 * ref).backward()
    for a, r in zip(ins, ref_ins, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, nothing kept for backward
        torch.testing.assert_close(ChunkedCrossEntropy.apply(hidden, weight, b, targets, chunk), ref.float().detach(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model,method,packed,chunked", [
    ("tiny_llama", "lora", False, False), ("tiny_qwen", "full", False, False), ("tiny_gpt2", "lora", False, False),
    ("tiny_llama", "prompt_tuning", False, False), ("tiny_llama", "lora", True, False),
    ("tiny_llama", "lora", False, True), ("tiny_qwen", "full", False, True), ("tiny_gpt2", "lora", False, True),
    ("tiny_llama", "prompt_tuning", False, True), ("tiny_llama", "lora", True, True),
])
def test_logits_at_target_positions_give_the_full_losses_and_gradients(make_cfg, model, method, packed, chunked):
    """The output layer sees only the positions that have a target (or, with trainer.chunked_loss,
    none: the loss is scored in chunks from their hidden states); the loss and every trainable
    gradient (the tied head's too, in full fine-tuning) equal those of full logits scored by task_loss
    (prompt masking, padding, virtual tokens of prompt tuning, a packed row)."""
    run = setup(make_cfg(f"model={model}", "dataset=demo_instructions", f"method={method}",
                         f"trainer.chunked_loss={str(chunked).lower()}"))
    assert run.target_logits.chunked is chunked
    examples = run.data.train[:5]
    batch = (PackingCollator(False) if packed else Collator(run.tokenizer.pad_token_id, "causal_lm"))(examples)
    assert (batch["labels"][:, 1:] == -100).float().mean() > 0.3  # masked prompts (and padding) to skip
    params = [p for p in run.model.parameters() if p.requires_grad]

    def loss_and_grads(selected: bool):
        for p in params:
            p.grad = None
        if selected:
            outputs, loss, n = run.target_logits.forward(run.model, batch, "causal_lm")
            assert outputs.logits.shape[:2] == (1, 0 if chunked else n)  # only the scored positions were projected
        else:
            loss, n = task_loss(run.model(**model_inputs(batch)).logits, batch["labels"], "causal_lm")
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in params]

    run.model.eval()  # no dropout: the two forwards must see the same network
    full, n_full, g_full = loss_and_grads(False)
    sel, n_sel, g_sel = loss_and_grads(True)
    assert n_sel == n_full == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(sel, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_sel, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # outside a scored forward the hook passes every position through (generation, merge checks)
    assert run.model(**model_inputs(batch)).logits.shape[1] >= batch["input_ids"].shape[1]


def test_adamw_is_fused_on_cpu_and_steps_like_the_unfused_one(make_cfg):
    run = lora_run(make_cfg)
    assert run.optimizer.defaults["fused"] is True
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    for step in grads:
        for p, gr in zip(params, step, strict=True):
            p.grad = gr.clone()
        run.optimizer.step()
    fused = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    plain = torch.optim.AdamW(run.optimizer.param_groups[0]["params"], lr=run.optimizer.defaults["lr"],
                              weight_decay=run.optimizer.defaults["weight_decay"], fused=False, foreach=False)
    assert len(run.optimizer.param_groups) == 1
    for step in grads:
        for p, gr in zip(params, step, strict=True):
            p.grad = gr.clone()
        plain.step()
    for a, b in zip(fused, params, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
    assert any(not torch.equal(a, s) for a, s in zip(fused, start, strict=True))  # it did move


def test_fused_adamw_can_be_turned_off(make_cfg):
    cfg = make_cfg("model=tiny_llama", "dataset=demo_instructions", "++optimizer.fused=false")
    run = setup(cfg)
    assert not run.optimizer.defaults["fused"]
    assert build_optimizer(cfg, run.method, run.model, torch.device("cpu")).defaults["fused"] is False


def compiled_vs_eager(make_cfg) -> tuple[dict, dict]:
    overrides = ["model=tiny_llama", "dataset=demo_instructions", "trainer.max_steps=3",
                 "trainer.group_by_length=false"]
    eager = train(make_cfg(*overrides, out="eager"))
    compiled = train(make_cfg(*overrides, "trainer.compile=true", out="compiled"))
    return eager, compiled


@pytest.mark.slow  # compiling takes about half a minute on 2 cores; trainer.compile is off by default
def test_compile_trains_to_the_same_loss(make_cfg, monkeypatch):
    """trainer.compile compiles the model in place through torch.compile (dynamo's graph capture); the
    eager backend stands in for inductor, whose C++ compilation takes minutes on a small CPU (the slow
    test below runs it)."""
    calls = []
    plain = torch.nn.Module.compile

    def compile_eager(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return plain(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    eager, compiled = compiled_vs_eager(make_cfg)
    assert calls == ["PeftModelForCausalLM"]
    assert compiled["eval/loss"] == pytest.approx(eager["eval/loss"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_compile_with_inductor_trains_to_the_same_loss(make_cfg):
    eager, compiled = compiled_vs_eager(make_cfg)
    assert compiled["eval/loss"] == pytest.approx(eager["eval/loss"], rel=1e-5, abs=1e-5)


def test_compile_without_a_compiler_is_refused_clearly(make_cfg, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("ftune.train.shutil.which", lambda name: None)
    with pytest.raises(FtuneError, match="trainer.compile=true on CPU needs a C\\+\\+ compiler"):
        lora_run(make_cfg, "trainer.compile=true")
