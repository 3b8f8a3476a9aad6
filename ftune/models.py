"""Load a pretrained model (hub id or local directory) or build a tiny one from a config.

Two tasks: ``causal_lm`` (AutoModelForCausalLM, supervised fine-tuning and continued pretraining)
and ``seq_cls`` (AutoModelForSequenceClassification, single texts and text pairs). Weights load from
safetensors only; ``trust_remote_code`` stays off unless the model config turns it on.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ftune.config import ModelConfig
from ftune.errors import FtuneError
from ftune.models_gguf import resolve_gguf

TASK_HEADS = ("classifier", "score")  # sequence-classification heads across bert/llama/gpt2/qwen
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def _check_local_model_dir(path: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        raise FtuneError(
            f"Model path '{path}' does not exist. Pass `model.path=` a local directory holding "
            f"config.json and *.safetensors, or a Hugging Face hub id such as meta-llama/Llama-3.2-1B."
        )
    ggufs = sorted(f.name for f in p.glob("*.gguf")) if p.is_dir() else []
    if not (p / "config.json").exists() and ggufs:
        raise FtuneError(
            f"Model directory '{path}' holds GGUF checkpoints ({', '.join(ggufs[:3])}) but no config.json; choose "
            f"one with `model.gguf_file={ggufs[0]}` (converted once to a cached safetensors model)."
        )
    if not (p / "config.json").exists():
        raise FtuneError(
            f"Model directory '{path}' has no config.json, so it is not a transformers model directory. "
            f"Point `model.path=` at the folder that `save_pretrained` wrote."
        )
    if not any(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").exists():
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        extra = (
            f" It holds pickled weights ({', '.join(pickled)}), which ftune does not load because "
            f"unpickling can run arbitrary code; convert them to safetensors first."
            if pickled
            else ""
        )
        raise FtuneError(
            f"Model directory '{path}' has no *.safetensors weights.{extra} Point `model.path=` at the folder "
            f"that `save_pretrained` wrote (config.json and model*.safetensors), or at a hub id."
        )


def model_label(cfg: ModelConfig) -> str:
    """How the model is named to the user: its path (with the GGUF file inside it), else its config name."""
    if cfg.path and cfg.gguf_file:
        return f"{cfg.name} ({Path(cfg.path).expanduser() / cfg.gguf_file})"
    return cfg.path or cfg.name


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (eos, or unk) set when the tokenizer has none."""
    from transformers import AutoTokenizer

    cfg = resolve_gguf(cfg)  # a GGUF checkpoint: its converted (cached) folder
    source = cfg.tokenizer or cfg.path
    if source is None:
        raise FtuneError(f"Model '{cfg.name}' sets neither `path` nor `tokenizer`; set `model.tokenizer=`.")
    if _is_local(source) and not Path(source).expanduser().exists():
        raise FtuneError(f"Tokenizer path '{source}' does not exist; set `model.tokenizer=` to a local folder.")
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise FtuneError(
            f"Could not load the tokenizer for model '{cfg.name}' from '{source}': {e}. "
            f"Check the hub id (and your network or HF_HOME cache) or the local path."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(
    cfg: ModelConfig,
    task: str,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load or build the base model for ``task`` ("causal_lm", "seq_cls" or "masked_lm") on the CPU.

    With ``model.upcycle_experts`` the dense model is then upcycled into a Mixtral-style MoE (ftune.moe.upcycle),
    the same one every time (its router is drawn from ``init_seed``): eval, merge and generate rebuild it from the
    run's config.yaml."""
    from ftune.moe import check_upcycle, upcycle

    check_upcycle(cfg.upcycle_experts, cfg.upcycle_top_k)
    model = _build_dense(cfg, task, num_labels=num_labels, label_names=label_names, pad_token_id=pad_token_id,
                         dtype=dtype)
    if cfg.upcycle_experts:
        model = upcycle(model, cfg.upcycle_experts, cfg.upcycle_top_k, cfg.init_seed)
    return model


def _build_dense(cfg: ModelConfig, task: str, *, num_labels: int | None, label_names: list[str] | None,
                 pad_token_id: int | None, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    auto = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}.get(
        task, AutoModelForSequenceClassification)
    extra: dict = {}
    if task == "seq_cls":
        extra["num_labels"] = num_labels
        if label_names:
            extra["id2label"] = dict(enumerate(label_names))
            extra["label2id"] = {n: i for i, n in enumerate(label_names)}
    if cfg.config is not None:
        config = AutoConfig.for_model(**dict(cfg.config), **extra)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        with torch.random.fork_rng():  # the same init_seed always gives the same base weights
            torch.manual_seed(cfg.init_seed)
            model = auto.from_config(config, dtype=dtype or torch.float32)
        return model
    if cfg.path is None:
        raise FtuneError(f"Model '{cfg.name}' sets neither `path` nor `config`; set `model.path=`.")
    cfg = resolve_gguf(cfg)  # a GGUF checkpoint: its converted (cached) folder
    if _is_local(cfg.path):
        _check_local_model_dir(cfg.path)
    if dtype is None:
        dtype = DTYPES.get(cfg.dtype, torch.float32) if cfg.dtype != "auto" else torch.float32
    try:
        model = auto.from_pretrained(
            cfg.path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            **extra,
        )
    except OSError as e:
        raise FtuneError(
            f"Could not load model '{cfg.name}' from '{cfg.path}': {e}. Check the hub id and your network "
            f"(or the HF_HOME cache), or point `model.path=` at a local directory with safetensors weights."
        ) from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def head_names(model: nn.Module, task: str) -> list[str]:
    """Names of the task-head modules (always trained) of a sequence-classification model."""
    if task != "seq_cls":
        return []
    return [n for n in TASK_HEADS if isinstance(getattr(model, n, None), nn.Module)]


QUANT_BLOCK = 64  # NF4 block size: each block of 64 consecutive weights of a row shares one scale


def quantizable_4bit(in_features: int) -> str | None:
    """Why a linear layer with ``in_features`` inputs stays in full precision, or None if it can be NF4.

    A block must not straddle two rows of the weight: rows narrower than a block, or not a whole number
    of blocks, would share scales across output features (and bitsandbytes' CPU inference kernels
    reshape the scales per row and fail on them).
    """
    if in_features < QUANT_BLOCK:
        return f"narrower than the {QUANT_BLOCK}-wide quantization block"
    if in_features % QUANT_BLOCK:
        return f"input width not a multiple of the {QUANT_BLOCK}-wide quantization block"
    return None


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype, device: torch.device, skip: list[str],
                  report: dict | None = None) -> nn.Module:
    """Replace each quantizable nn.Linear (except ``skip`` modules and the LM head) with an NF4 bitsandbytes layer.

    The decision is per layer (``quantizable_4bit``): layers that cannot be quantized safely stay in full
    precision, and ``report`` (when given) receives how many were quantized and how many were not. A
    model where nothing can be quantized is refused. The layers are quantized when moved to ``device``
    (CPU or CUDA), which is how bitsandbytes 0.50 quantizes on both; double quantization of the scales
    is on, as in the QLoRA paper.

    On CPUs with AVX512-BF16 bitsandbytes would repack a layer's weight in eval mode for a bf16 kernel
    (scales rounded to bf16), so evaluation would compute differently than training and than on other
    CPUs; ftune turns that path off per layer, so every CPU dequantizes and multiplies the same way.
    """
    from ftune.thirdparty import bitsandbytes_hidden

    try:
        if bitsandbytes_hidden():
            raise ImportError
        import bitsandbytes as bnb
    except ImportError:
        raise FtuneError(
            "QLoRA needs bitsandbytes, which is not installed. Install it with `pip install bitsandbytes` "
            "or choose `method=lora` to train on unquantized weights."
        ) from None

    from transformers.pytorch_utils import Conv1D

    skip = set(skip) | {"lm_head"}
    replaced, kept = 0, {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) not in (nn.Linear, Conv1D) or full.split(".")[0] in skip:
                continue
            # GPT-2's Conv1D stores the weight transposed (in, out); a Linear4bit wants (out, in).
            weight = child.weight.data.t() if isinstance(child, Conv1D) else child.weight.data
            in_features, out_features = weight.shape[1], weight.shape[0]
            reason = quantizable_4bit(in_features)
            if reason is not None:
                kept[full] = reason
                continue
            q = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                compress_statistics=True,
            )
            q.support_avx512bf16_for_cpu = False  # one numeric path on every CPU (see the docstring)
            q.weight = bnb.nn.Params4bit(
                weight.to(torch.float32).contiguous(),
                requires_grad=False,
                quant_type="nf4",
                compress_statistics=True,
                blocksize=QUANT_BLOCK,
            )
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, child_name, q.to(device))
            replaced += 1
    if replaced == 0:
        widths = sorted({reason for reason in kept.values()})
        raise FtuneError(
            f"4-bit quantization found no linear layer it can quantize in this model ({len(kept)} linear layers, "
            f"all {' or '.join(widths) or 'excluded'}), so a 4-bit method would train an unquantized model. Use "
            f"`method=lora` (or `method.quantize=false`) for this model; 4-bit pays off on models whose layers "
            f"are at least {QUANT_BLOCK} wide."
        )
    if report is not None:
        report.update({"quantization/layers_4bit": replaced, "quantization/layers_full_precision": len(kept)})
        if kept:
            report["quantization/full_precision_reason"] = "; ".join(
                f"{n} {r}" for r, n in sorted(Counter(kept.values()).items()))
    model.to(device)
    # What transformers sets when it loads a 4-bit model: peft reads it to wrap these layers with
    # its bitsandbytes-aware LoRA layers and to prepare the model for k-bit training.
    model.is_loaded_in_4bit = True
    return model

