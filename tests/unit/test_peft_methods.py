"""The method table beyond the core methods: peft's families (ftune.methods.lora / prompts /
peft_generic) on tiny Llama, tiny BERT and the real MiniLM, and ftune's own adapters (adapters /
mixtures) on MiniLM (their tiny-model table, with Llama, Qwen, Mistral and GPT-2, is test_adapters.py).

Each case trains a few optimizer steps on one fixed batch (with the loop's method hooks), checks the
trainable-parameter count against a formula computed here from the architecture's shapes (the model
YAML or config.json), independently of ftune's and peft's code, then saves, reloads onto a fresh base
model and compares logits. Method-specific checks follow the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ftune.errors import FtuneError, MethodNotApplicable
from ftune.evaluate import model_inputs, task_loss
from ftune.methods import METHODS, build_method
from ftune.methods.base import MethodContext, trainable_parameters
from ftune.models import build_model
from ftune.train import setup

from conftest import compose_train, fixed_batch, logits_of

DATASET = {"tiny_llama": "demo_instructions", "tiny_bert": "sentiment", "minilm": "sentiment"}
P, H_ENC = 8, 32  # virtual tokens and prefix-MLP width used by the prompt cases


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster, and far faster on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shapes(cfg) -> dict:
    c = dict(cfg.model.config) if cfg.model.config is not None else json.loads(Path(cfg.model.path, "config.json").read_text())
    h = c.get("hidden_size", c.get("n_embd"))
    heads = c.get("num_attention_heads", c.get("n_head"))
    kv_heads = c.get("num_key_value_heads", heads)
    return {"h": h, "L": c.get("num_hidden_layers", c.get("n_layer")), "ff": c.get("intermediate_size", 4 * h),
            "kv": kv_heads * (h // heads), "type": c["model_type"]}


def expected_trainable(method: str, s: dict, labels: int) -> int:
    """The method's trainable parameters, from the paper's construction and the shapes."""
    h, L, ff, kv = s["h"], s["L"], s["ff"], s["kv"]
    head = h * labels + labels if labels else 0  # the classifier / score head (bias-free for llama's score)
    if s["type"] == "llama":
        qv = [(h, h), (h, kv)]  # (in, out) of q_proj and v_proj
        kv_dim = kv  # width of a layer's keys (GQA: kv heads x head size), what a prefix holds
        ia3 = L * (kv + kv + ff)  # l_k, l_v on k/v outputs, l_ff on the FFN activation (down_proj input)
        norms = (2 * L + 1) * h  # input / post-attention RMSNorm weights and the final norm
        head = h * labels if labels else 0
    else:  # bert
        qv = [(h, h), (h, h)]
        kv_dim = h
        ia3 = L * (h + h + ff)
        norms = None
    lora = lambda r: L * sum(r * (i + o) for i, o in qv)  # noqa: E731  (B·A per target)
    if method in ("lora", "loraplus", "pissa"):
        return lora(8) + head
    if method == "rslora":
        return lora(16) + head
    if method == "dora":
        return lora(8) + L * sum(o for _, o in qv) + head  # + the magnitude vector (one per output)
    if method == "adalora":  # P (out x r), Λ (r), Q (r x in) at init_r = 12
        return L * sum(12 * (i + o + 1) for i, o in qv) + head
    if method == "ia3":
        return ia3 + head
    if method == "prompt_tuning":
        return P * h + head
    if method == "ptuning":  # embedding P x h, MLP h -> H -> H -> h (H = h by default)
        return P * h + (h * h + h) * 3 + head
    if method == "prefix_tuning":  # embedding P x d, MLP d -> H_ENC -> 2·L·d
        return P * kv_dim + (kv_dim * H_ENC + H_ENC) + (H_ENC * 2 * L * kv_dim + 2 * L * kv_dim) + head
    if method == "ptuning_v2":  # keys and values of P tokens at every layer
        return P * 2 * L * kv_dim + head
    # ftune's own adapters at their YAML settings (bert only: tests/unit/test_adapters.py covers the rest)
    adapter = lambda m, gated=False: h * m + m + m * h + h + (h + 1 if gated else 0)  # noqa: E731  down, up, gate
    if method == "adapter_houlsby":  # after attention and after the FFN (bottleneck h/16), both LayerNorms
        return L * (2 * adapter(h // 16) + 2 * (2 * h)) + head
    if method == "adapter_pfeiffer":  # after the FFN, bottleneck h/16
        return L * adapter(h // 16) + head
    if method == "mam":  # 30 prefix keys and values per layer + a parallel FFN adapter, bottleneck h/2
        return L * (2 * 30 * kv_dim + adapter(h // 2)) + head
    if method == "unipelt":  # gated: 10-token prefix, LoRA r=8 on q and v, adapter h/16
        gated_lora = lambda o: 8 * h + o * 8 + h + 1  # noqa: E731  A, B, gate
        return L * (2 * 10 * kv_dim + h + 1 + sum(gated_lora(o) for _, o in qv) + adapter(h // 16, True)) + head
    if method == "peft:LOHA":  # two Hadamard-multiplied rank-r factorisations per target, r = 8
        return 2 * lora(8) + head
    if method == "peft:VERA":  # frozen shared random A, B; trained scaling vectors d (r) and b (out), r = 16
        return L * sum(16 + o for _, o in qv) + head
    if method == "peft:LN_TUNING":
        return norms + head
    raise KeyError(method)


# (method, model, overrides, lr for the overfit)
CASES = [
    ("dora", "tiny_llama", [], 3e-2),
    ("rslora", "tiny_llama", [], 3e-2),
    ("pissa", "tiny_llama", [], 3e-2),
    ("loraplus", "tiny_llama", [], 1e-2),
    ("adalora", "tiny_llama", [], 5e-2),
    ("ia3", "tiny_llama", [], 1e-1),
    ("prompt_tuning", "tiny_llama", [], 1e-1),
    ("prefix_tuning", "tiny_llama", [], 3e-2),
    ("ptuning", "tiny_llama", [], 3e-2),
    ("ptuning_v2", "tiny_llama", [], 1e-1),
    ("peft:LOHA", "tiny_llama", [], 3e-2),
    ("peft:VERA", "tiny_llama", ["method.config={r:16}"], 1e-1),
    ("peft:LN_TUNING", "tiny_llama", [], 5e-2),
    ("dora", "tiny_bert", [], 3e-2),
    ("rslora", "tiny_bert", [], 3e-2),
    ("pissa", "tiny_bert", [], 3e-2),
    ("loraplus", "tiny_bert", [], 1e-2),
    ("adalora", "tiny_bert", [], 5e-2),
    ("ia3", "tiny_bert", [], 1e-1),
    ("prompt_tuning", "tiny_bert", [], 1e-1),
    ("prefix_tuning", "tiny_bert", [], 3e-2),
    ("ptuning", "tiny_bert", [], 3e-2),
    ("ptuning_v2", "tiny_bert", [], 1e-1),
    ("peft:LOHA", "tiny_bert", [], 3e-2),
    ("dora", "minilm", [], 3e-3),
    ("rslora", "minilm", [], 3e-3),
    ("pissa", "minilm", [], 3e-3),
    ("loraplus", "minilm", [], 1e-3),
    ("adalora", "minilm", [], 3e-2),
    ("ia3", "minilm", [], 3e-2),
    ("prompt_tuning", "minilm", [], 3e-2),
    ("prefix_tuning", "minilm", [], 1e-3),
    ("ptuning", "minilm", [], 1e-2),
    ("ptuning_v2", "minilm", [], 3e-2),
    ("adapter_houlsby", "minilm", [], 2e-3),
    ("adapter_pfeiffer", "minilm", [], 3e-3),
    ("mam", "minilm", [], 3e-3),
    ("unipelt", "minilm", [], 3e-3),
]
STEPS = 25
BATCH = {"tiny_llama": 2, "tiny_bert": 4, "minilm": 4}
# The tiny models are random. At the default init (std 0.02) a Llama's final RMSNorm and lm_head bound
# every logit to about ±1.3, so a method that trains neither (q/v LoRA, prompts) cannot lower the LM loss
# by more than ~18% however well it fits; tiny BERT's pooler passes almost nothing to the head. A wider
# init (same shapes, so the same counts) gives the methods room to show they train.
TINY_INIT = "+model.config.initializer_range=0.1"
PROMPT = {"prompt_tuning", "prefix_tuning", "ptuning", "ptuning_v2"}
ADAPTERS = {"adapter_houlsby", "adapter_pfeiffer", "mam", "unipelt"}  # ftune's own; not mergeable


def method_overrides(method: str, model: str = "tiny_llama") -> list[str]:
    name, _, peft_type = method.partition(":")
    out = [TINY_INIT] if model.startswith("tiny") else []
    out += [f"method={name}", "scheduler=constant", f"trainer.max_steps={STEPS}", "trainer.max_length=64"]
    if peft_type:
        out += [f"method.peft_type={peft_type}"]
    if name in ("dora", "rslora", "pissa", "loraplus", "adalora"):
        out += ["method.dropout=0.0"]
    if name == "adalora":
        out += ["method.deltaT=1"]
    if name in PROMPT:
        out += [f"method.num_virtual_tokens={P}"]
    if name == "prefix_tuning":
        out += [f"method.encoder_hidden_size={H_ENC}"]
    return out


def train_steps(run, batch, steps: int) -> list[float]:
    """What train_loop does per optimizer step (hooks included), on one fixed batch."""
    run.model.train()
    losses = []
    for step in range(steps):
        outputs = run.model(**model_inputs(batch))
        loss_sum, n = task_loss(outputs.logits, batch["labels"], run.data.task)
        loss = loss_sum / n
        extra = run.method.extra_loss(run.model, batch, outputs, step)
        (loss + extra if extra is not None else loss).backward()
        run.method.after_backward(run.model, step)
        run.optimizer.step()
        run.scheduler.step()
        run.method.after_step(run.model, step)
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def fresh_base(run):
    return build_model(run.model_cfg, run.data.task, num_labels=len(run.data.label_names) or None,
                       pad_token_id=run.tokenizer.pad_token_id)


@pytest.mark.parametrize("method,model,extra,lr", CASES, ids=[f"{m}-{a}" for m, a, _, _ in CASES])
def test_peft_method_trains_counts_and_reloads(method, model, extra, lr, tmp_path):
    cfg = compose_train([f"model={model}", f"dataset={DATASET[model]}", *method_overrides(method, model), *extra,
                         f"optimizer.lr={lr}"], tmp_path / "run")
    run = setup(cfg)
    labels = len(run.data.label_names)
    assert trainable_parameters(run.model)[0] == expected_trainable(method, shapes(cfg), labels)

    batch = fixed_batch(run, BATCH[model])
    losses = train_steps(run, batch, STEPS)
    assert losses[-1] < 0.8 * losses[0], losses

    trained = logits_of(run.model, batch)
    adapter = tmp_path / "adapter"
    run.method.save(run.model, adapter)
    if labels:  # the task head is trained and saved with every method
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
            assert any(k.split(".")[-2] in ("classifier", "score") or ".classifier." in k or ".score." in k
                       for k in f.keys()), list(f.keys())
    reloaded = run.method.load(fresh_base(run), adapter, run.ctx)
    again = logits_of(reloaded, batch)
    if method == "pissa":  # reloaded as W + s·[B | -B0][A ; A0] on the original base: equal up to rounding
        torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)
    elif method == "adalora":  # reloaded with the pruned ranks removed: the same sums in another order
        torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(again, trained, atol=1e-6, rtol=0)

    name = method.partition(":")[0]
    if name in PROMPT or name in ADAPTERS:
        assert not run.method.mergeable
        with pytest.raises(FtuneError, match="cannot be merged"):
            run.method.merge(reloaded)
    else:
        assert run.method.mergeable
        merged = run.method.merge(reloaded)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(logits_of(merged, batch), trained, atol=1e-4, rtol=1e-4)


# More of peft's tuners through method=peft: each builds on its own defaults (OFT/BOFT with blocks that
# divide the tiny width), trains, and reloads to the same logits. Counts are in the table above for
# LOHA, VERA and LN_TUNING; FourierFT's is n_frequency (1000) spectral coefficients per target.
OTHER_TUNERS = [("LOKR", []), ("OFT", ["method.config={r:0,oft_block_size:8}"]),
                ("BOFT", ["method.config={boft_block_size:8}"]), ("FOURIERFT", []), ("HRA", [])]


@pytest.mark.parametrize("peft_type,extra", OTHER_TUNERS, ids=[t for t, _ in OTHER_TUNERS])
def test_other_peft_tuners_train_and_reload(peft_type, extra, tmp_path):
    cfg = compose_train(["model=tiny_llama", "dataset=demo_instructions", TINY_INIT, "method=peft",
                         f"method.peft_type={peft_type}", "scheduler=constant", "optimizer.lr=1e-2", *extra],
                        tmp_path / "run")
    run = setup(cfg)
    trainable = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora" not in n) for n in trainable)
    if peft_type == "FOURIERFT":
        assert sum(t.numel() for t in trainable.values()) == 1000 * 2 * shapes(cfg)["L"]  # q and v
    batch = fixed_batch(run, 2)
    train_steps(run, batch, 3)
    assert any(not torch.equal(p, trainable[n]) for n, p in run.model.named_parameters() if p.requires_grad)
    trained = logits_of(run.model, batch)
    run.method.save(run.model, tmp_path / "adapter")
    reloaded = run.method.load(fresh_base(run), tmp_path / "adapter", run.ctx)
    torch.testing.assert_close(logits_of(reloaded, batch), trained, atol=1e-6, rtol=0)


def test_mergeable_flags():
    expected = {"dora": True, "rslora": True, "pissa": True, "loraplus": True, "adalora": True, "ia3": True,
                "prompt_tuning": False, "prefix_tuning": False, "ptuning": False, "ptuning_v2": False}
    assert {m: METHODS[m].mergeable for m in expected} == expected
    for peft_type, mergeable in [("LOHA", True), ("VERA", True), ("LN_TUNING", True), ("PROMPT_TUNING", False),
                                 ("POLY", False)]:
        assert build_method({"name": "peft", "peft_type": peft_type}).mergeable is mergeable, peft_type


def test_adalora_budget_shrinks_to_target_and_saves_it(make_cfg, tmp_path):
    steps = 12
    run = setup(make_cfg("method=adalora", "model=tiny_llama", "dataset=demo_instructions", "optimizer.lr=2e-2",
                         "method.deltaT=1", "method.dropout=0.0", f"trainer.max_steps={steps}", "trainer.max_length=64"))
    config = run.model.peft_config["default"]
    assert config.total_step == steps and config.tinit + config.tfinal < steps and config.tfinal >= 1
    targets = 2 * shapes(run.cfg)["L"]  # q_proj and v_proj of every block
    batch = fixed_batch(run)
    # extra_loss is the orthogonality term peft adds to the model's own loss when labels are passed
    with_reg = run.model(**model_inputs(batch), labels=batch["labels"]).loss
    without = run.model.base_model.model(**model_inputs(batch), labels=batch["labels"]).loss
    torch.testing.assert_close(run.method.extra_loss(run.model, batch, None, 0), with_reg - without)
    e = [p for n, p in run.model.named_parameters() if "lora_E" in n]
    assert len(e) == targets and sum(p.numel() for p in e) == 12 * targets  # init_r everywhere to start
    train_steps(run, batch, steps)
    ranks = run.method.rank_budget()
    assert sum(ranks.values()) == 8 * targets, ranks  # target_r on average: the budget shrank
    assert sum(sum(v) for v in config.rank_pattern.values()) == 8 * targets
    assert all(0 <= r <= 12 for r in ranks.values())  # reallocated between targets, within init_r

    state = run.method.state_dict()  # what a checkpoint keeps to resume exactly
    assert state["rank_pattern"] and set(state["ipt"]) == set(state["exp_avg_ipt"]) == set(state["exp_avg_unc"])

    run.method.save(run.model, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        saved_ranks = sum(f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_E" in k)
    assert saved_ranks == 8 * targets  # the saved adapter holds only the surviving ranks
    assert sum(sum(v) for v in run.model.peft_config["default"].rank_pattern.values()) == 8 * targets


def test_adalora_resumes_exactly(tmp_path):
    from ftune.train import train_loop

    common = ["method=adalora", "model=tiny_llama", "dataset=demo_instructions", "method.deltaT=1",
              "trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_checkpoints=5", "trainer.max_length=64",
              "dataset.eval_fraction=0.01", "optimizer.lr=2e-2"]
    first = setup(compose_train(common, tmp_path / "a"))
    train_loop(first)
    final = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    pattern = first.method.state_dict()["rank_pattern"]

    resumed = setup(compose_train(common + [f"resume={tmp_path / 'a' / 'checkpoints' / 'step-000003'}"], tmp_path / "b"))
    train_loop(resumed)
    after = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert resumed.method.state_dict()["rank_pattern"] == pattern
    for n, p in final.items():
        torch.testing.assert_close(after[n], p, atol=0, rtol=0, msg=n)


def test_loraplus_optimizer_groups(make_cfg):
    from peft.optimizers import create_loraplus_optimizer

    run = setup(make_cfg("method=loraplus", "model=tiny_bert", "dataset=sentiment", "optimizer.lr=1e-3"))
    groups = run.optimizer.param_groups
    names = {id(p): n for n, p in run.model.named_parameters()}
    by_lr: dict[float, list[str]] = {}
    for g in groups:
        by_lr.setdefault(g["lr"], []).extend(names[id(p)] for p in g["params"])
    assert set(by_lr) == {1e-3, 16e-3}
    assert by_lr[16e-3] and all("lora_B" in n or n.endswith("bias") for n in by_lr[16e-3])
    assert by_lr[1e-3] and all("lora_A" in n or "classifier" in n for n in by_lr[1e-3])
    assert any("lora_B" in n for n in by_lr[16e-3]) and any("lora_A" in n for n in by_lr[1e-3])
    # the same grouping as peft's own LoRA+ optimizer
    reference = create_loraplus_optimizer(run.model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ref = {(g["lr"], frozenset(id(p) for p in g["params"])) for g in reference.param_groups if g["params"]}
    assert {(g["lr"], frozenset(id(p) for p in g["params"])) for g in groups} == ref


def test_pissa_saved_adapter_is_a_lora_of_the_original_base(make_cfg, tmp_path):
    from peft import PeftModel

    run = setup(make_cfg("method=pissa", "model=tiny_llama", "dataset=demo_instructions", "optimizer.lr=2e-2",
                         "method.dropout=0.0", "trainer.max_length=64"))
    base = fresh_base(run)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    residual = dict(run.model.base_model.model.named_parameters())
    w = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.allclose(residual[w], original["model.layers.0.self_attn.q_proj.weight"])  # W -> W_res
    batch = fixed_batch(run)
    train_steps(run, batch, 10)
    trained = logits_of(run.model, batch)
    run.method.save(run.model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # plain peft, the original weights
    assert torch.equal(loaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
                       original["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(logits_of(loaded, batch), trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_of(run.model, batch), trained, atol=0, rtol=0)


def test_dora_on_a_4bit_base(make_cfg, tmp_path):
    import bitsandbytes as bnb

    run = setup(make_cfg("method=dora", "method.quantize=true", "model=tiny_llama", "dataset=demo_instructions",
                         "optimizer.lr=3e-2", "method.dropout=0.0", "trainer.max_length=64"))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules()) == 7 * shapes(run.cfg)["L"]
    s = shapes(run.cfg)
    assert trainable_parameters(run.model)[0] == expected_trainable("dora", s, 0)
    batch = fixed_batch(run)
    losses = train_steps(run, batch, 8)
    assert losses[-1] < losses[0]
    trained = logits_of(run.model, batch)
    run.method.save(run.model, tmp_path / "adapter")
    reloaded = run.method.load(fresh_base(run), tmp_path / "adapter", run.ctx)
    torch.testing.assert_close(logits_of(reloaded, batch), trained, atol=1e-5, rtol=1e-5)
    with pytest.raises(MethodNotApplicable, match="full-precision"):
        run.method.merge(reloaded)


def test_ia3_targets_only_the_ffn_output_as_feedforward_on_bert(make_cfg):
    from peft.tuners.ia3 import IA3Layer

    run = setup(make_cfg("method=ia3", "model=tiny_bert", "dataset=sentiment"))
    layers = {n: m for n, m in run.model.named_modules() if isinstance(m, IA3Layer)}
    L = shapes(run.cfg)["L"]
    assert len(layers) == 3 * L
    assert not any("attention.output" in n for n in layers)
    assert all(m.is_feedforward == n.endswith(".output.dense") for n, m in layers.items())


def test_prefix_tuning_refuses_activation_checkpointing(make_cfg):
    for method in ("prefix_tuning", "ptuning_v2"):
        with pytest.raises(MethodNotApplicable, match="activation_checkpointing=false"):
            setup(make_cfg(f"method={method}", "model=tiny_llama", "dataset=demo_instructions",
                           "trainer.activation_checkpointing=true", out=method))


def test_prompt_tuning_text_init(make_cfg):
    cfg = make_cfg("model=tiny_llama", "dataset=demo_instructions", "method=prompt_tuning", "method.init=text",
                   "method.init_text=Reverse the word", f"method.num_virtual_tokens={P}")
    run = setup(make_cfg("model=tiny_llama", "dataset=demo_instructions", out="plain"))
    method = build_method(cfg.method)
    base = fresh_base(run)
    ids = run.tokenizer("Reverse the word")["input_ids"]
    ids = (ids * P)[:P]
    want = base.get_input_embeddings().weight[ids].detach().clone()
    ctx = MethodContext(task="causal_lm", model_type="llama", total_steps=4,
                        tokenizer_path=run.model_cfg.tokenizer)
    method.check(base, ctx)
    model = method.prepare(base, ctx)
    got = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(got.detach(), want)
    with pytest.raises(MethodNotApplicable, match="method.init_text"):
        build_method({**dict(cfg.method), "init_text": None}).check(base, ctx)


def test_prompt_learning_on_a_decoder_classifier(make_cfg, tmp_path):
    """Llama's classifier pools the last real token, with input-level prompts too; prefixes reach it."""
    for method in ("prompt_tuning", "ptuning_v2"):
        run = setup(make_cfg(f"method={method}", "model=tiny_llama", "dataset=sentiment",
                             f"method.num_virtual_tokens={P}", "trainer.max_length=64", out=method))
        assert trainable_parameters(run.model)[0] == expected_trainable(method, shapes(run.cfg), 2)
        examples = sorted(run.data.train[:8], key=lambda e: len(e["input_ids"]))
        short, long = examples[0], examples[-1]
        assert len(short["input_ids"]) < len(long["input_ids"])
        alone = logits_of(run.model, run.collator([short]))
        padded = logits_of(run.model, run.collator([short, long]))[:1]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
        batch = fixed_batch(run)
        losses = train_steps(run, batch, 5)
        assert all(map(lambda x: x == x, losses))
        trained = logits_of(run.model, batch)
        run.method.save(run.model, tmp_path / method)
        reloaded = run.method.load(fresh_base(run), tmp_path / method, run.ctx)
        torch.testing.assert_close(logits_of(reloaded, batch), trained, atol=1e-6, rtol=0)


def test_unknown_peft_type_lists_the_choices(make_cfg):
    with pytest.raises(FtuneError, match=r"Unknown peft_type 'NOPE'.*LOHA.*VERA"):
        build_method(make_cfg("method=peft", "method.peft_type=NOPE").method)
    with pytest.raises(FtuneError, match="does not take"):
        setup(make_cfg("method=peft", "method.peft_type=LOHA", "method.config={rank:4}", "model=tiny_bert",
                       "dataset=sentiment"))


def test_user_target_modules_override(make_cfg):
    run = setup(make_cfg("method=dora", "model=tiny_llama", "dataset=demo_instructions",
                         "method.target_modules=[o_proj]"))
    lora_layers = {n.split(".lora_A")[0] for n, _ in run.model.named_parameters() if "lora_A" in n}
    assert lora_layers and all(n.endswith("o_proj") for n in lora_layers)
