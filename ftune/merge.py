"""`ftune merge`: fold a run's trained weights into its base model and save a plain transformers model.

    ftune merge run=runs/x out=models/x-merged [overwrite=true] [save_dtype=bfloat16]

The result (safetensors shards, config.json, generation_config.json, tokenizer) loads with
``AutoModelFor{CausalLM,SequenceClassification}.from_pretrained(out)``; neither peft nor ftune is
needed, and no peft or ftune key is left in config.json.

- LoRA-family methods fold ``B·A`` into the weights (peft's ``merge_and_unload``); full, freeze and
  bitfit runs already hold whole weights, so the merge is the base with them loaded.
- QLoRA: the base is reloaded in full precision (never quantized) and the adapter applied there;
  merging into the 4-bit weights would lose what the adapter learned to NF4 rounding.
- Methods that add modules (bottleneck adapters, prefixes, ...) cannot be merged: the command says
  what to use instead, exits non-zero and writes nothing.

Before anything is written, the merged model's logits are compared with base+adapter's on a few
real inputs of the run's data; beyond ``tolerance`` the command fails. The model is saved to a
temporary directory next to ``out`` and renamed into place, so ``out`` is never half-written.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ftune.errors import FtuneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json keys that must not leak into a merged model: ftune's bookkeeping, peft's, and the
# quantization settings of a 4-bit base.
FORBIDDEN_CONFIG_PREFIXES = ("ftune", "peft", "quantization_config", "_pre_quantization_dtype")


class MergeCheckFailed(FtuneError):
    """Merged and unmerged logits differ beyond the tolerance; nothing was written."""

    exit_code = 1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def not_mergeable_error(method) -> FtuneError:
    """Why ``method`` cannot be merged and what to use instead (the message of ``Method.merge``)."""
    from ftune.methods.base import Method

    try:
        Method.merge(method, None)
    except FtuneError as e:
        return FtuneError(f"{e} Nothing was written.")
    return FtuneError(  # pragma: no cover - Method.merge always raises
        f"Method '{method.name}' cannot be merged into the base weights; {method.not_mergeable_hint}. Nothing was written."
    )


def check_out_dir(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FtuneError(f"out={out} is a file; choose a directory for the merged model. Nothing was written.")
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents:
        raise FtuneError(f"out={out} would replace the run directory itself; choose another out. Nothing was written.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        names = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise FtuneError(
            f"out={out} already exists and is not empty ({names}). Nothing was written. Choose a new out, "
            f"or replace it with overwrite=true."
        )


def check_inputs(run_cfg, tokenizer, task: str, n: int, max_length: int, label_names: list[str]) -> dict[str, torch.Tensor]:
    """A batch of ``n`` real examples from the run's eval data (else its training data)."""
    from dataclasses import replace

    from ftune.config import validate_group
    from ftune.data import build_data
    from ftune.data.collate import Collator
    from ftune.progress import console

    data_cfg = validate_group(run_cfg, "dataset")
    if task == "seq_cls":
        data_cfg = replace(data_cfg, label_names=list(label_names))
    data_cfg = replace(data_cfg, max_samples=n, max_eval_samples=n)
    model_cfg = validate_group(run_cfg, "model")
    try:
        bundle = build_data(data_cfg, tokenizer, max_length, int(run_cfg.get("seed", 42)), model_cfg.chat_template)
        examples = (bundle.eval or bundle.train)[:n]
    except FtuneError as e:  # the data moved or is offline: check on plain sentences instead
        console.print(f"[yellow]note[/] the run's data could not be read ({e}); checking on fixed sentences.")
        texts = ["The quick brown fox jumps over the lazy dog.", "Fine-tuning adapts a pretrained model.",
                 "What is the capital of France?", "2 + 2 = 4"][:max(1, n)]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        examples = [{"input_ids": ids, "labels": 0 if task == "seq_cls" else list(ids)} for ids in enc["input_ids"]]
        if "token_type_ids" in enc:
            for ex, tt in zip(examples, enc["token_type_ids"], strict=True):
                ex["token_type_ids"] = tt
    return Collator(tokenizer.pad_token_id, task)(examples)


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from ftune.evaluate import model_inputs

    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits.float().cpu()
    if out.dim() == 3:  # causal LM: only the real (non-pad) positions count
        out = out[batch["attention_mask"].bool()]
    return out


def clean_config(model: nn.Module) -> list[str]:
    """Remove ftune / peft / quantization keys from the model's config; returns what was removed."""
    config = model.config
    removed = [k for k in list(vars(config)) if k.startswith(FORBIDDEN_CONFIG_PREFIXES)]
    for k in removed:
        delattr(config, k)
    for attr in ("is_loaded_in_4bit", "is_quantized", "hf_quantizer", "peft_config", "_hf_peft_config_loaded"):
        if attr in vars(model):
            delattr(model, attr)
    return removed


def _leaked_keys(config_json: Path) -> list[str]:
    data = json.loads(config_json.read_text())
    return [k for k in data if k.startswith(FORBIDDEN_CONFIG_PREFIXES)]


def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` (replacing an old ``out`` only once ``tmp`` is complete)."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.ftune-old-{os.getpid()}")
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class MergedRun(NamedTuple):
    """A run merged in memory and checked against base+adapter (what :func:`merge_in_memory` returns)."""

    model: nn.Module
    tokenizer: Any
    method: Any
    cfg: Any
    task: str
    label_names: list[str]
    batch: dict[str, torch.Tensor]  # the real examples the check ran on
    max_abs_diff: float
    tolerance: float
    qlora: bool


def merge_in_memory(run: str | Path, *, device: str = "cpu", tolerance: float | None = None,
                    check_examples: int = 4, check_max_length: int = 128, dtype: str = "float32",
                    before_loading: Callable[[Any, Any], None] | None = None) -> MergedRun:
    """Load run ``run``, fold its weights into the base and check the merged logits; nothing is written.

    ``before_loading(run_cfg, method)`` runs once the run's config is read, before any weight is loaded
    (``ftune export`` refuses architectures it cannot write there).
    """
    from ftune.methods.base import build_method
    from ftune.methods.lora import PeftMethod
    from ftune.progress import console
    from ftune.runs import check_run_dir, is_quantized, load_run, run_config

    run_dir = check_run_dir(run)
    run_cfg = run_config(run_dir)
    method = build_method(run_cfg.method)
    if not method.mergeable:
        raise not_mergeable_error(method)
    if dtype not in DTYPES:
        raise FtuneError(f"dtype must be one of {', '.join(DTYPES)} (got '{dtype}').")
    if before_loading is not None:
        before_loading(run_cfg, method)
    if tolerance is None:
        tolerance = 1e-4 if dtype == "float32" else 5e-2
    qlora = is_quantized(method)  # qlora, or a LoRA variant with method.quantize=true

    with console.status(f"Loading run {run}" + (" (base in full precision)" if qlora else "")):
        model, tokenizer, method, run_cfg, task, label_names = load_run(run_dir, device, quantized=False,
                                                                         dtype=DTYPES[dtype])
    if qlora:
        console.print(
            f"[bold]{method.name} run on a 4-bit base:[/] the base model was reloaded in full precision ({dtype}) and the LoRA adapter "
            f"applied there; nothing is merged into 4-bit weights. The check compares against that "
            f"full-precision base+adapter."
        )
    batch = check_inputs(run_cfg, tokenizer, task, check_examples, check_max_length, label_names)
    reference = logits_of(model, batch)
    merged = PeftMethod.merge(method, model) if qlora else method.merge(model)
    merged.eval()
    if any(p.__class__.__name__ == "Params4bit" for p in merged.parameters()):
        raise FtuneError("The merged model still holds 4-bit weights; this is a bug in ftune. Nothing was written.")
    got = logits_of(merged, batch)
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    scale = float(reference.abs().max())
    # float32 rounding grows with the logits' size and the depth: the exact merge of a LoRA into a 30-layer model
    # whose logits reach 40 (SmolLM2-135M) differs by ~1e-4. So the float32 tolerance holds up to |logit| 10 and
    # grows in proportion beyond; half precision is relative to the logits throughout.
    allowed = tolerance * max(1.0, scale / 10) if dtype == "float32" else tolerance * max(1.0, scale)
    console.print(
        f"check: merged vs base+adapter logits on {batch['input_ids'].shape[0]} examples of the run's data: "
        f"max abs diff {diff:.3g} (tolerance {allowed:.3g}, logits up to {scale:.3g})"
    )
    if not diff <= allowed:
        raise MergeCheckFailed(
            f"The merged model's logits differ from base+adapter's by {diff:.3g} (more than {allowed:.3g}); the "
            f"merge is wrong, so nothing was written. Report this with the run's config.yaml; meanwhile "
            f"`ftune eval`/`ftune generate` load the adapter on the fly."
        )
    return MergedRun(merged, tokenizer, method, run_cfg, task, label_names, batch, diff, allowed, qlora)


def keep_training_chat_template(tokenizer, run_cfg, task: str) -> None:
    """A causal-LM run trained with ftune's chat template keeps it in the saved tokenizer."""
    from ftune.config import validate_group
    from ftune.data.formats import chat_template_for

    if task == "causal_lm" and not getattr(tokenizer, "chat_template", None):
        data_cfg = validate_group(run_cfg, "dataset")
        if data_cfg.format == "chat" or data_cfg.prompt_template == "chat":  # keep the template it trained with
            tokenizer.chat_template = chat_template_for(tokenizer, validate_group(run_cfg, "model").chat_template)


def merge_run(run: str | Path, out: str | Path, *, overwrite: bool = False, device: str = "cpu",
              tolerance: float | None = None, check_examples: int = 4, check_max_length: int = 128,
              dtype: str = "float32", save_dtype: str = "auto", max_shard_size: str = "5GB") -> dict[str, Any]:
    """Merge run ``run`` into a standalone model directory ``out``; returns what it measured."""
    from ftune.config import validate_group
    from ftune.progress import console
    from ftune.runs import check_run_dir

    started = time.perf_counter()
    if out is None or str(out) in ("", "???"):
        raise FtuneError("Pass the directory for the merged model: `ftune merge run=runs/x out=models/x-merged`.")
    run_dir = check_run_dir(run)
    out = Path(str(out)).expanduser()

    def check_settings(run_cfg, method) -> None:
        nonlocal save_dtype
        check_out_dir(out, run_dir, overwrite)
        if save_dtype == "auto":
            model_dtype = validate_group(run_cfg, "model").dtype
            save_dtype = model_dtype if model_dtype in DTYPES else "float32"
        if save_dtype not in DTYPES:
            raise FtuneError(f"save_dtype must be auto or one of {', '.join(DTYPES)} (got '{save_dtype}').")

    merged, tokenizer, method, run_cfg, task, _, _, diff, allowed, qlora = merge_in_memory(
        run, device=device, tolerance=tolerance, check_examples=check_examples, check_max_length=check_max_length,
        dtype=dtype, before_loading=check_settings)

    removed = clean_config(merged)
    merged.to(DTYPES[save_dtype])
    keep_training_chat_template(tokenizer, run_cfg, task)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.ftune-tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        with console.status(f"Saving to {out}"):
            merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
            tokenizer.save_pretrained(str(tmp))
        leaked = _leaked_keys(tmp / "config.json")
        if leaked:
            raise FtuneError(f"config.json of the merged model still holds {leaked}; this is a bug in ftune. Nothing was written.")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    auto = "AutoModelForCausalLM" if task == "causal_lm" else "AutoModelForSequenceClassification"
    result = {
        "run": str(run), "out": str(out), "method": method.name, "task": task, "max_abs_diff": diff,
        "tolerance": allowed, "dtype": save_dtype, "qlora_full_precision": qlora, "removed_config_keys": removed,
        "size_mb": _dir_size_mb(out), "peak_memory_mb": peak_rss_mb(), "seconds": time.perf_counter() - started,
        "params": sum(p.numel() for p in merged.parameters()),
    }
    console.print(
        f"[bold green]merged[/] {method.name} run {run} -> {out} ({result['params']:,} parameters, {save_dtype}, "
        f"{result['size_mb']:.1f} MB on disk; peak memory {result['peak_memory_mb']:.0f} MB)\n"
        f"  load it with transformers.{auto}.from_pretrained('{out}')"
    )
    return result


def run_merge(cfg) -> dict[str, Any]:
    """The `ftune merge` command."""
    return merge_run(
        cfg.get("run"), cfg.get("out"), overwrite=bool(cfg.overwrite), device=str(cfg.device),
        tolerance=cfg.get("tolerance"), check_examples=int(cfg.check_examples),
        check_max_length=int(cfg.check_max_length), dtype=str(cfg.dtype), save_dtype=str(cfg.save_dtype),
        max_shard_size=str(cfg.max_shard_size),
    )
