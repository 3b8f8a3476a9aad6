"""Load a finished run directory back into a model: the inverse of ``train.finish``.

    model, tokenizer, method, cfg, task, label_names = load_run("runs/x")

reads ``config.yaml``, rebuilds the base model with :func:`ftune.models.build_model` (classification:
the class names from ``labels.json``), builds the run's method from its recorded settings and
applies ``method.load(base, run/"adapter", ctx)``. Every method loads this way, also the ones that
cannot be merged. ``eval``, ``merge`` and ``generate`` all start here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from ftune.config import DatasetConfig, ModelConfig, validate_group
from ftune.errors import FtuneError
from ftune.methods.base import Method, MethodContext, build_method

# peft and ftune's own loaders raise these when tensors or module names do not fit the base model.
_MISFIT_ERRORS = (RuntimeError, ValueError, KeyError, AttributeError)


class LoadedRun(NamedTuple):
    """What :func:`load_run` returns; unpacks as the 6-tuple (model, tokenizer, method, cfg, task, label_names)."""

    model: torch.nn.Module
    tokenizer: Any
    method: Method
    cfg: DictConfig
    task: str
    label_names: list[str]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu (as ``ftune train`` picks; kept here so loading a run
    does not import the training loop)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FtuneError(f"device={name} but no CUDA GPU is available; use device=cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FtuneError(f"Unknown device '{name}'; use auto, cpu, cuda or cuda:<index>.") from None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto | fp32 | bf16 | fp16) on ``device``; None for fp32."""
    if precision in ("auto", None):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision not in ("bf16", "fp16"):
        raise FtuneError(f"precision must be auto, fp32, bf16 or fp16 (got '{precision}').")
    if precision == "fp16" and device.type != "cuda":
        raise FtuneError("precision fp16 needs a CUDA GPU; on CPU use fp32 (or bf16).")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, or a FtuneError saying why ``run_dir`` is not one."""
    if run_dir is None or str(run_dir) in ("", "???"):
        raise FtuneError("No run given: pass run=<the output_dir of a `ftune train` run>, e.g. run=runs/x.")
    path = Path(str(run_dir)).expanduser()
    if not path.exists():
        raise FtuneError(f"Run directory '{run_dir}' does not exist. Pass run=<the output_dir of a `ftune train` run>.")
    if not path.is_dir():
        raise FtuneError(f"run={run_dir} is a file, not a run directory. Pass run=<the output_dir of a `ftune train` run>.")
    if not (path / "config.yaml").exists() and (path / "error.txt").exists():
        first = ((path / "error.txt").read_text().strip().splitlines() or ["(empty error.txt)"])[0]
        raise FtuneError(f"Run '{run_dir}' failed before it trained anything, so there is nothing to load: {first}")
    if not (path / "config.yaml").exists():
        hint = ""
        subruns = sorted(p.parent.name for p in path.glob("*/config.yaml"))
        if subruns:
            hint = f" It holds runs in sub-directories ({', '.join(subruns[:4])}); pass one of them, or use `ftune compare {run_dir}`."
        raise FtuneError(
            f"'{run_dir}' is not an ftune run directory (no config.yaml).{hint} "
            f"Pass run=<the output_dir of a `ftune train` run>."
        )
    if not (path / "adapter").is_dir():
        failed = (path / "error.txt").exists()
        why = ("the run failed (see its error.txt)" if failed
               else "training did not finish (interrupted runs continue with `ftune train ... resume=auto`)")
        raise FtuneError(f"Run '{run_dir}' has no trained weights (no adapter/ folder): {why}.")
    return path


def run_config(run_dir: Path) -> DictConfig:
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    for key in ("model", "dataset", "method"):
        if key not in cfg:
            raise FtuneError(f"'{run_dir}/config.yaml' has no '{key}' section; it was not written by `ftune train`.")
    return cfg


def run_label_names(run_dir: Path) -> list[str]:
    file = Path(run_dir) / "labels.json"
    return [str(x) for x in json.loads(file.read_text())] if file.exists() else []


def load_run_tokenizer(run_dir: Path, model_cfg: ModelConfig):
    """The tokenizer the run saved (run/tokenizer), else the model config's."""
    from ftune.models import load_tokenizer

    saved = Path(run_dir) / "tokenizer"
    if saved.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(saved), trust_remote_code=model_cfg.trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok
    return load_tokenizer(model_cfg)


def method_context(model: torch.nn.Module, task: str, device: torch.device,
                   compute_dtype: torch.dtype = torch.float32) -> MethodContext:
    from ftune.models import head_names

    return MethodContext(task=task, model_type=model.config.model_type, head_names=head_names(model, task),
                         device=device, compute_dtype=compute_dtype)


def _model_label(model_cfg: ModelConfig) -> str:
    return model_cfg.path or model_cfg.name


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", *, model_cfg: ModelConfig | None = None,
             quantized: bool = True, dtype: torch.dtype | None = None) -> LoadedRun:
    """Rebuild the trained model of ``run_dir`` on ``device``, in eval mode.

    ``model_cfg`` replaces the run's own base model (a local copy of the same model, say); an adapter
    that does not fit it raises a FtuneError. ``quantized=False`` loads the adapter of a run trained on
    a 4-bit base (qlora, ``method.quantize=true``) onto the full-precision base instead of the NF4-quantized
    one it was trained on (what ``merge`` does).
    """
    from ftune.data import task_of
    from ftune.methods.lora import PeftMethod
    from ftune.models import build_model

    path = check_run_dir(run_dir)
    cfg = run_config(path)
    run_model_cfg: ModelConfig = validate_group(cfg, "model")
    data_cfg: DatasetConfig = validate_group(cfg, "dataset")
    task = task_of(data_cfg)
    method = build_method(cfg.method)
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    base_cfg = model_cfg or run_model_cfg
    other_model = model_cfg is not None and _model_label(model_cfg) != _model_label(run_model_cfg)

    tokenizer = load_run_tokenizer(path, base_cfg if other_model else run_model_cfg)
    label_names = run_label_names(path)
    if task == "seq_cls" and not label_names:
        raise FtuneError(f"Run '{run_dir}' is a classification run but has no labels.json; it did not finish training.")
    base = build_model(base_cfg, task, num_labels=len(label_names) or None, label_names=label_names,
                       pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    ctx = method_context(base, task, device)
    adapter = path / "adapter"
    try:
        if is_quantized(method) and not quantized:
            model = PeftMethod.load(method, base, adapter, ctx)  # the adapter onto the full-precision base
        else:
            model = method.load(base, adapter, ctx)
        _check_peft_keys(model, adapter)
    except FtuneError as e:
        raise FtuneError(f"Run '{run_dir}': {e}") from None
    except _MISFIT_ERRORS as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        trained_on = _model_label(run_model_cfg)
        raise FtuneError(
            f"The adapter of run '{run_dir}' (method {method.name}, trained on '{trained_on}') does not fit the base "
            f"model '{_model_label(base_cfg)}': {first}. A run's weights only load onto the model it was trained "
            f"on; pass that run's own directory, or drop the model override."
        ) from None
    model.to(device)
    model.eval()
    return LoadedRun(model, tokenizer, method, cfg, task, label_names)


def is_quantized(method: Method) -> bool:
    """Whether the method trains on a 4-bit quantized base (qlora, or a LoRA variant with quantize=true)."""
    return bool(getattr(method, "quantized", False))


def _check_peft_keys(model: torch.nn.Module, adapter: Path) -> None:
    """peft loads an adapter with missing tensors silently: every saved tensor must land in the model."""
    if not (adapter / "adapter_config.json").exists() or not hasattr(model, "peft_config"):
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    file = adapter / "adapter_model.safetensors"
    if not file.exists():
        return
    with safe_open(str(file), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    missing = sorted(set(expected) - set(saved))
    unknown = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    if missing or unknown or wrong:
        raise ValueError(
            f"tensors missing from the adapter: {missing[:2]}, unknown to the model: {unknown[:2]}, "
            f"of another shape: {wrong[:2]}"
        )


def base_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """A model config for evaluating a base model: ``model.path`` given for a config-built model wins."""
    if model_cfg.path and model_cfg.config is not None:
        tokenizer = model_cfg.tokenizer
        if (Path(model_cfg.path).expanduser() / "tokenizer_config.json").exists():
            tokenizer = model_cfg.path
        return replace(model_cfg, config=None, tokenizer=tokenizer)
    return model_cfg
