"""One table: every core method x architecture trains, counts, saves and reloads.

The expected trainable-parameter counts are computed here from the architecture's shapes (the
model YAML), independently of ftune's and peft's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftune.errors import MethodNotApplicable
from ftune.evaluate import model_inputs, task_loss
from ftune.methods.base import trainable_parameters
from ftune.models import build_model
from ftune.train import setup

from conftest import compose_train, fixed_batch, logits_of

DATASET = {"tiny_llama": "demo_instructions", "tiny_qwen": "demo_instructions", "tiny_gpt2": "demo_instructions",
           "tiny_bert": "sentiment", "minilm": "sentiment"}


def shapes(cfg) -> dict:
    if cfg.model.get("config") is not None:
        c = dict(cfg.model.config)
    else:
        c = json.loads(Path(cfg.model.path, "config.json").read_text())
    h = c.get("hidden_size", c.get("n_embd"))
    heads = c.get("num_attention_heads", c.get("n_head"))
    kv = c.get("num_key_value_heads", heads)
    return {"h": h, "L": c.get("num_hidden_layers", c.get("n_layer")), "ff": c.get("intermediate_size", 4 * h),
            "kv": kv * (h // heads), "V": c["vocab_size"], "type": c["model_type"],
            "tied": c.get("tie_word_embeddings", True)}


def llama_layer(s, bias_qkv=False):
    h, ff, kv = s["h"], s["ff"], s["kv"]
    attn = h * h + 2 * h * kv + h * h + (h + 2 * kv if bias_qkv else 0)
    return attn + 3 * h * ff + 2 * h


def bert_counts(s, labels=2):
    h, ff = s["h"], s["ff"]
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h
    biases = 4 * h + h + ff + h + h  # q k v o, attn LN, intermediate, output dense, output LN
    head = h * labels + labels
    return layer, biases, head


def expected(method: str, model: str, cfg) -> int:
    s = shapes(cfg)
    h, L, kv = s["h"], s["L"], s["kv"]
    if s["type"] in ("llama", "qwen2"):
        layer = llama_layer(s, bias_qkv=s["type"] == "qwen2")
        lm_head = 0 if s["tied"] else s["V"] * h
        if method == "full":
            return s["V"] * h + L * layer + h + lm_head
        if method == "freeze":  # the last 2 blocks and the final norm
            return 2 * layer + h
        if method == "lora":  # q and v, r=8
            return L * 8 * ((h + h) + (h + kv))
        if method == "qlora":  # every linear layer of the blocks, r=16
            ff = s["ff"]
            return L * 16 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + ff))
        if method == "bitfit":  # qwen2's q/k/v biases
            return L * (h + 2 * kv)
    if s["type"] == "gpt2":
        if method == "lora":  # c_attn (h -> 3h), r=8
            return L * 8 * (h + 3 * h)
    if s["type"] == "bert":
        layer, biases, head = bert_counts(s)
        if method == "full":
            emb = s["V"] * h + 512 * h + 2 * h + 2 * h
            return emb + L * layer + (h * h + h) + head
        if method == "freeze":
            return 2 * layer + head
        if method == "lora":
            return L * 8 * 2 * (h + h) + head
        if method == "bitfit":  # every bias (embedding LN, blocks, pooler) and the head
            return h + L * biases + h + head
        if method == "qlora":
            ff = s["ff"]
            return L * 16 * (4 * (h + h) + 2 * (h + ff)) + 16 * (h + h) + head  # blocks + pooler
    raise KeyError((method, model))


# (method, model, lr for overfitting one batch in 40 steps)
CASES = [
    ("full", "tiny_llama", 3e-3), ("freeze", "tiny_llama", 1e-2), ("lora", "tiny_llama", 5e-2),
    ("qlora", "tiny_llama", 5e-2), ("bitfit", "tiny_qwen", 1e-1), ("lora", "tiny_gpt2", 5e-2),
    ("full", "tiny_bert", 1e-3), ("freeze", "tiny_bert", 1e-2), ("lora", "tiny_bert", 1e-2),
    ("qlora", "tiny_bert", 1e-2), ("full", "minilm", 1e-4), ("freeze", "minilm", 1e-3), ("lora", "minilm", 3e-3),
    ("qlora", "minilm", 1e-3), ("bitfit", "minilm", 3e-3),
]


@pytest.mark.parametrize("method,model,lr", CASES, ids=[f"{m}-{a}" for m, a, _ in CASES])
def test_method_trains_counts_and_reloads(method, model, lr, tmp_path):
    overrides = [f"method={method}", f"model={model}", f"dataset={DATASET[model]}", f"optimizer.lr={lr}",
                 "scheduler=constant", "method.dropout=0.0" if method in ("lora", "qlora") else "seed=0"]
    if model.startswith("tiny_") and DATASET[model] != "sentiment":
        # Same shapes (and counts), livelier random weights: at the default init (0.02) the frozen
        # output head caps every logit near zero and adapter-only methods barely move the loss.
        overrides.append("+model.config.initializer_range=0.1")
    cfg = compose_train(overrides, tmp_path / "run")
    run = setup(cfg)
    assert trainable_parameters(run.model)[0] == expected(method, model, cfg)

    batch = fixed_batch(run)
    run.model.train()
    losses = []
    for _ in range(40):  # overfit one batch
        loss_sum, n = task_loss(run.model(**model_inputs(batch)).logits, batch["labels"], run.data.task)
        (loss_sum / n).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        losses.append(float(loss_sum.detach() / n))
    # Adapter-only methods on from-scratch tiny causal LMs cannot touch the frozen random output
    # head, so they fall less far (0.58-0.67 of the start here) than full/freeze or the classifiers.
    assert losses[-1] < losses[0] * (0.7 if run.data.task == "seq_cls" else 0.8), losses

    trained = logits_of(run.model, batch)
    run.method.save(run.model, tmp_path / "adapter")
    base = build_model(run.model_cfg, run.data.task, num_labels=len(run.data.label_names) or None,
                       pad_token_id=run.tokenizer.pad_token_id)
    reloaded = run.method.load(base, tmp_path / "adapter", run.ctx)
    assert torch.equal(logits_of(reloaded, batch), trained)


def test_qlora_layers_really_are_4bit(make_cfg):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    run = setup(make_cfg("method=qlora", "model=tiny_llama", "dataset=demo_instructions"))
    quantized = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    s = shapes(run.cfg)
    assert len(quantized) == 7 * s["L"]  # q k v o gate up down in every block
    for q in quantized:
        assert q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == "nf4"
        assert q.weight.numel() * 2 == q.weight.quant_state.shape.numel()  # two 4-bit values a byte
        assert not q.weight.requires_grad
    assert sum(isinstance(m, LoraLinear4bit) for m in run.model.modules()) == 7 * s["L"]
    assert not any("layers" in n and "lora" not in n for n, m in run.model.named_modules() if type(m) is torch.nn.Linear)


def test_bitfit_count_on_bert(make_cfg):
    cfg = make_cfg("method=bitfit", "model=tiny_bert", "dataset=sentiment")
    run = setup(cfg)
    assert trainable_parameters(run.model)[0] == expected("bitfit", "tiny_bert", cfg)


def test_bitfit_on_llama_explains_why_not(make_cfg):
    with pytest.raises(MethodNotApplicable, match="has none"):
        setup(make_cfg("method=bitfit", "model=tiny_llama", "dataset=demo_instructions"))


def test_classification_head_is_always_trainable(make_cfg):
    for method in ("lora", "freeze", "bitfit"):
        run = setup(make_cfg(f"method={method}", "model=tiny_bert", "dataset=sentiment", out=method))
        head = [n for n, p in run.model.named_parameters() if "classifier" in n and p.requires_grad]
        assert head, method
