"""ftune's own adapter methods (adapter_houlsby, adapter_pfeiffer, mam, unipelt) on tiny models.

Every model is built from a config with a fixed seed (no downloads). Expected trainable-parameter
counts are computed here from the architectures' shapes, independently of the method code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from ftune.errors import FtuneError, MethodNotApplicable
from ftune.methods import adapters, mixtures
from ftune.methods.base import MethodContext, build_method, trainable_parameters

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "method"

H, LAYERS, LABELS = 32, 2, 3  # every tiny model: hidden size 32, 2 blocks; BERT classifies 3 labels
P, R = 3, 2  # prefix length, LoRA rank used in the tests
SETTINGS = {
    "adapter_houlsby": {"reduction_factor": 8},  # bottleneck 32 // 8 = 4
    "adapter_pfeiffer": {"bottleneck_size": 6},
    "mam": {"prefix_length": P, "bottleneck_size": 8, "scaling": 4.0},
    "unipelt": {"prefix_length": P, "lora_r": R, "lora_alpha": 4, "bottleneck_size": 4},
}
METHODS = list(SETTINGS)
PREFIX_METHODS = ["mam", "unipelt"]
ARCHS = ["llama", "gpt2", "bert"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and idle-spinning threads crawl on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(arch: str):
    config = _tiny_config(arch)
    # weights at the scale of a trained model, so that a frozen LM head can express a confident prediction
    config.initializer_range = 0.2
    return config


def _tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=H, n_layer=LAYERS, n_head=4, bos_token_id=1, eos_token_id=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "bert":
        return BertConfig(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_labels=LABELS, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    if arch == "qwen3":  # head_dim 16: q/k/v widths differ from the hidden size
        return Qwen3Config(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    if arch == "mistral":  # a sliding window shorter than the test sequences
        return MistralConfig(vocab_size=128, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4, pad_token_id=0)
    raise ValueError(arch)


def task_of(arch: str) -> str:
    return "seq_cls" if arch == "bert" else "causal_lm"


def base_model(arch: str, task: str | None = None, attn: str = "sdpa") -> nn.Module:
    """The same randomly initialised model every time for the same arguments."""
    task = task or task_of(arch)
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    config = tiny_config(arch)
    if task == "seq_cls":
        config.num_labels = LABELS
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation=attn)


def context(model: nn.Module, task: str, **kw) -> MethodContext:
    heads = [n for n in ("classifier", "score") if task == "seq_cls" and hasattr(model, n)]
    return MethodContext(task=task, model_type=model.config.model_type, head_names=heads, **kw)


def make_method(name: str, **overrides):
    return build_method({"name": name, **SETTINGS[name], **overrides})


def prepared(name: str, arch: str, task: str | None = None, attn: str = "sdpa", **overrides):
    task = task or task_of(arch)
    model = base_model(arch, task, attn)
    method = make_method(name, **overrides)
    torch.manual_seed(1)
    return method, method.prepare(model, context(model, task)), task


def batch(arch: str, task: str, size: int = 4, length: int = 10) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 19, (size, length), generator=g)  # few distinct tokens: learnable in 30 steps
    labels = torch.randint(0, LABELS, (size,), generator=g) if task == "seq_cls" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def perturb_trainable(model: nn.Module, scale: float = 0.3) -> None:
    """Move every trainable tensor off its initial value (zero-initialised ones included)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# --- expected parameter counts, from the shapes alone ---------------------------------------------
def shapes(arch: str, task: str) -> dict:
    c = tiny_config(arch)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or H // heads
    norm = H if arch in ("llama", "qwen2", "qwen3", "mistral") else 2 * H  # RMSNorm weight | LayerNorm w+b
    head = 0
    if task == "seq_cls":
        head = H * LABELS + (LABELS if arch == "bert" else 0)  # bert classifier has a bias, score has none
    return {"q": heads * head_dim, "kv": kv_heads * head_dim, "norm": norm, "head": head}


def adapter_count(m: int, gated: bool = False) -> int:
    return H * m + m + m * H + H + (H + 1 if gated else 0)  # down (w+b), up (w+b), gate (w+b)


def gated_lora_count(out_features: int) -> int:
    return R * H + out_features * R + H + 1  # A, B, gate


def expected_trainable(name: str, arch: str, task: str) -> int:
    s = shapes(arch, task)
    prefix = 2 * P * s["kv"]  # keys and values
    per_layer = {
        "adapter_houlsby": 2 * adapter_count(H // 8) + 2 * s["norm"],
        "adapter_pfeiffer": adapter_count(6),
        "mam": prefix + adapter_count(8),
        "unipelt": prefix + (H + 1)  # the prefix and its gate
        + gated_lora_count(s["q"]) + gated_lora_count(s["kv"]) + adapter_count(4, gated=True),
    }[name]
    return LAYERS * per_layer + s["head"]


# --- 1. trainable parameters ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_trainable_parameter_count(name, arch):
    _, model, task = prepared(name, arch)
    assert trainable_parameters(model)[0] == expected_trainable(name, arch, task)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("name", METHODS)
def test_llama_family_count_and_training_step(name, arch):
    _, model, task = prepared(name, arch)
    assert trainable_parameters(model)[0] == expected_trainable(name, arch, task)
    model(**batch(arch, task)).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", METHODS)
def test_sequence_classification_head_is_trained(name):
    _, model, task = prepared(name, "llama", task="seq_cls")
    assert model.score.weight.requires_grad
    assert trainable_parameters(model)[0] == expected_trainable(name, "llama", "seq_cls")


def test_only_method_modules_head_and_houlsby_norms_are_trainable():
    _, model, _ = prepared("adapter_houlsby", "bert")
    for n, p in model.named_parameters():
        block_norm = "LayerNorm" in n and ".encoder.layer." in n
        expected = ".ftune." in n or n.startswith("classifier.") or block_norm
        assert p.requires_grad == expected, n


# --- 2. outputs right after prepare ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["adapter_houlsby", "adapter_pfeiffer"])
def test_adapters_start_identical_to_base(name, arch):
    task = task_of(arch)
    b = batch(arch, task)
    reference = base_model(arch).eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    _, model, _ = prepared(name, arch)
    logits = model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_mixtures_change_outputs_only_through_the_prefix(name, arch):
    """MAM and UniPELT do not start identical to the base: the prefix keys take attention mass from
    the first step. Their adapters and LoRA start at zero, so without a prefix they are identical."""
    task = task_of(arch)
    b = batch(arch, task)
    reference = base_model(arch).eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    _, with_prefix, _ = prepared(name, arch)
    _, without_prefix, _ = prepared(name, arch, prefix_length=0)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    assert not torch.allclose(with_prefix.eval()(**inputs).logits, reference)
    assert torch.equal(without_prefix.eval()(**inputs).logits, reference)


# --- 3. training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_loss_falls_when_overfitting_one_batch(name, arch):
    _, model, task = prepared(name, arch)
    model.train()
    b = batch(arch, task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --- 4. save and load -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_reproduces_logits(name, arch, tmp_path):
    method, model, task = prepared(name, arch)
    perturb_trainable(model)
    b = batch(arch, task)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    trained = model.eval()(**inputs).logits
    method.save(model, tmp_path)

    index = json.loads((tmp_path / adapters.INDEX_FILE).read_text())
    assert index["method"] == name and index["model_type"] == model.config.model_type
    assert index["settings"] == dataclasses.asdict(method.settings)
    assert index["tensors"] == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert (tmp_path / adapters.WEIGHTS_FILE).exists()

    fresh = base_model(arch)
    # a method built from other settings still loads: the saved settings win
    other = build_method({"name": name})
    loaded = other.load(fresh, tmp_path, context(fresh, task))
    assert torch.equal(loaded.eval()(**inputs).logits, trained)


def test_load_rejects_another_method_or_model_type(tmp_path):
    method, model, _ = prepared("adapter_pfeiffer", "llama")
    method.save(model, tmp_path)
    with pytest.raises(FtuneError, match="method 'adapter_pfeiffer'"):
        make_method("adapter_houlsby").load(base_model("llama"), tmp_path, context(model, "causal_lm"))
    gpt2 = base_model("gpt2")
    with pytest.raises(FtuneError, match="'llama' model"):
        method.load(gpt2, tmp_path, context(gpt2, "causal_lm"))


# --- 5. UniPELT gates -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_unipelt_gates_are_trained(arch):
    _, model, task = prepared("unipelt", arch)
    gates = {n: p for n, p in model.named_parameters() if ".gate." in n}
    # per layer: prefix, LoRA q, LoRA v and adapter gates, each a weight and a bias
    assert len(gates) == LAYERS * 4 * 2
    assert all(p.requires_grad for p in gates.values())
    before = {n: p.detach().clone() for n, p in gates.items()}
    model.train()
    b = batch(arch, task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in gates.items():
        assert not torch.equal(p, before[n]), n


# --- 6. merge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_merge_is_refused(name):
    method, model, _ = prepared(name, "llama")
    assert method.mergeable is False
    with pytest.raises(FtuneError, match="cannot be merged into the base weights"):
        method.merge(model)


# --- 7. applicability -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_unsupported_model_type(name):
    class Stub(nn.Module):
        config = SimpleNamespace(model_type="t5")

    with pytest.raises(MethodNotApplicable, match="llama.*gpt2|gpt2.*llama"):
        make_method(name).prepare(Stub(), MethodContext(task="causal_lm", model_type="t5"))


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_prefix_needs_sdpa_or_eager(name):
    model = base_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(MethodNotApplicable, match="sdpa"):
        make_method(name).prepare(model, context(model, "causal_lm"))


def test_preparing_twice_is_refused():
    method, model, task = prepared("mam", "gpt2")
    with pytest.raises(MethodNotApplicable, match="fresh base model"):
        method.prepare(model, context(model, task))


def test_unknown_non_linearity_is_refused():
    model = base_model("llama")
    with pytest.raises(MethodNotApplicable, match="non_linearity"):
        make_method("adapter_pfeiffer", non_linearity="softplus").prepare(model, context(model, "causal_lm"))


# --- the prefix mechanism -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_prefix_takes_part_in_attention(name, arch):
    _, model, task = prepared(name, arch)
    b = batch(arch, task)
    model.eval()
    before = model(**b).logits
    prefix = model.base_model.get_submodule(adapters.ARCHS[arch].blocks)[0].ftune["prefix"]
    with torch.no_grad():
        prefix.key.add_(1.0)
    assert not torch.allclose(model(**b).logits, before)
    model(**b).loss.backward()
    assert prefix.key.grad.abs().sum() > 0 and prefix.value.grad.abs().sum() > 0


def _padded(arch: str):
    """Sequence 0 padded by two tokens (left for causal LMs, right for BERT), with position ids."""
    b = batch(arch, task_of(arch), size=2, length=8)
    ids, mask = b["input_ids"].clone(), b["attention_mask"].clone()
    pad = slice(6, 8) if arch == "bert" else slice(0, 2)
    ids[0, pad], mask[0, pad] = 0, 0
    kw = {} if arch == "bert" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return ids, mask, kw


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_prefix_eager_matches_sdpa_and_ignores_padding(name, arch):
    ids, mask, kw = _padded(arch)
    real = slice(0, 6) if arch == "bert" else slice(2, 8)
    outputs = []
    for attn in ("eager", "sdpa"):
        _, model, _ = prepared(name, arch, attn=attn)
        perturb_trainable(model)
        model.eval()
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask, **kw).logits
            alone = model(input_ids=ids[:1, real]).logits
        reference = padded[:1] if arch == "bert" else padded[:1, real]
        torch.testing.assert_close(alone, reference, atol=1e-5, rtol=1e-5)
        outputs.append(padded)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_prefix_keeps_causal_lms_causal_and_cache_consistent(name, arch):
    _, model, task = prepared(name, arch)
    perturb_trainable(model)
    model.eval()
    ids = batch(arch, task, size=2, length=8)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        changed = ids.clone()
        changed[:, 6] = 7
        torch.testing.assert_close(model(input_ids=changed).logits[:, :6], full[:, :6])

        out = model(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 8):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["adapter_houlsby", "unipelt"])
def test_activation_checkpointing_gives_the_same_gradients(name, arch):
    grads = []
    for checkpointing in (False, True):
        model = base_model(arch)
        method = make_method(name)
        torch.manual_seed(1)
        model = method.prepare(model, context(model, task_of(arch), activation_checkpointing=checkpointing))
        perturb_trainable(model)
        model.train()
        model(**batch(arch, task_of(arch))).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_deepcopy_gets_its_own_modules(name):
    _, model, task = prepared(name, "llama")
    perturb_trainable(model)
    model.eval()
    b = batch("llama", task)
    before = model(**b).logits
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(**b).logits, before)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if ".ftune." in n:
                p.add_(1.0)
    assert torch.equal(model(**b).logits, before)
    assert not torch.allclose(twin(**b).logits, before)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", METHODS)
def test_half_precision_base_trains_float32_modules(name, arch):
    model = base_model(arch).to(torch.bfloat16)
    model = make_method(name).prepare(model, context(model, task_of(arch)))
    assert {p.dtype for n, p in model.named_parameters() if ".ftune." in n} == {torch.float32}
    model.train()
    model(**batch(arch, task_of(arch))).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".ftune." in n)


# --- the YAML configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_method_yaml_builds(name):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    method = build_method(cfg)
    assert method.name == name and method.settings.lr > 0
    fields = {f.name for f in dataclasses.fields(method.settings_cls)}
    assert set(cfg.keys()) <= fields
    classes = {"adapter_houlsby": adapters.HoulsbyAdapter, "adapter_pfeiffer": adapters.PfeifferAdapter,
               "mam": mixtures.Mam, "unipelt": mixtures.UniPelt}
    assert type(method) is classes[name]
