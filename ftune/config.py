"""Where the configs live, the custom resolvers, and the typed schemas that validate them.

Hydra composes ``configs/train.yaml`` with one option from each group (model, dataset, method,
optimizer, scheduler, trainer). Overrides of keys that do not exist already fail in Hydra (struct
mode); the dataclasses below add type checks, so ``trainer.batch_size=abc`` or a misspelt key in a
YAML file fail before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ftune.errors import FtuneError

PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """``configs``/``recipes`` inside an installed wheel, else beside the package in a checkout."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FtuneError(f"ftune's {name}/ directory is missing next to {PACKAGE_DIR}; reinstall ftune.")


def config_dir() -> Path:
    return _resource_dir("configs")


def recipes_dir() -> Path:
    return _resource_dir("recipes")


def package_path(package: str, sub: str = "") -> str:
    """Absolute path of ``sub`` inside an installed Python package (resolver ``${pkg_path:...}``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FtuneError(
            f"The Python package '{package}' is not installed, but the config refers to a file inside "
            f"it. Install it (`pip install {package.replace('_', '-')}`) or point the config at a path."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


if not OmegaConf.has_resolver("pkg_path"):
    OmegaConf.register_new_resolver("pkg_path", package_path)


@dataclass
class ModelConfig:
    name: str = "???"
    path: Optional[str] = None  # hub id or local directory with safetensors weights
    config: Optional[Dict[str, Any]] = None  # build from this transformers config instead (tiny test models)
    tokenizer: Optional[str] = None  # defaults to path
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16: dtype the base weights are loaded in
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    init_seed: int = 0  # seed of the random init of models built from `config`
    chat_template: Optional[str] = None  # fallback template name when the tokenizer has none


@dataclass
class DatasetConfig:
    name: str = "???"
    format: str = "???"  # classification | instruction | chat | text
    path: str = "???"  # hub id, local file (json, jsonl, csv, tsv, parquet, txt) or directory
    subset: Optional[str] = None  # hub dataset configuration name
    split: str = "train"
    eval_split: Optional[str] = None
    eval_path: Optional[str] = None
    eval_fraction: Optional[float] = None
    max_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # classification
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[List[Any]] = None
    # instruction
    instruction_column: str = "instruction"
    input_column: Optional[str] = "input"
    output_column: str = "output"
    system_column: Optional[str] = None
    prompt_template: str = "alpaca"
    # chat
    messages_column: str = "messages"
    # causal LM
    train_on_prompt: bool = False
    pack: bool = False


@dataclass
class TrainerConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 16
    eval_batch_size: Optional[int] = None
    grad_accum: int = 1
    max_length: int = 512
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    eval_every: Optional[int] = None
    log_every: int = 10
    max_grad_norm: Optional[float] = 1.0
    activation_checkpointing: bool = False
    group_by_length: bool = True
    num_workers: int = 0
    save_every: Optional[int] = None
    keep_checkpoints: int = 2
    skip_nan_batches: bool = False
    progress: bool = True


SCHEMAS: dict[str, type] = {"model": ModelConfig, "dataset": DatasetConfig, "trainer": TrainerConfig}


def register_schemas() -> None:
    """Store each schema as option ``schema`` of its group; every YAML of the group extends it.

    So every key exists in every config of the group (``dataset.eval_path=...`` works on any
    dataset), and Hydra rejects a misspelt key or a wrong type at composition time.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


register_schemas()


def validate_group(cfg: DictConfig, group: str) -> Any:
    """Check ``cfg[group]`` against its schema; return it as a typed dataclass instance."""
    schema_cls = SCHEMAS[group]
    node = cfg[group]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), node)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "?")
        hint = " (a local json/jsonl/csv/tsv/parquet file or a hub id)" if group == "dataset" and key == "path" else ""
        raise FtuneError(
            f"The {group} config '{node.get('name', '?')}' needs a value for {group}.{key}{hint}; set it on the "
            f"command line, e.g. `ftune train {group}={node.get('name', '?')} {group}.{key}=...`."
        ) from None
    except OmegaConfBaseException as e:
        keys = ", ".join(f.name for f in dataclasses.fields(schema_cls))
        raise FtuneError(
            f"Invalid {group} setting: {getattr(e, 'msg', e)} (key '{getattr(e, 'full_key', '?')}'). "
            f"Valid {group} keys are: {keys}. Fix the override or the YAML under configs/{group}/."
        ) from None


def validate_values(trainer: TrainerConfig, lr: float) -> None:
    """Reject values that type-check but cannot train."""
    problems = []
    if trainer.batch_size < 1:
        problems.append(f"trainer.batch_size must be at least 1 (got {trainer.batch_size})")
    if trainer.grad_accum < 1:
        problems.append(f"trainer.grad_accum must be at least 1 (got {trainer.grad_accum})")
    if trainer.max_steps is not None and trainer.max_steps < 1:
        problems.append(
            f"trainer.max_steps must be at least 1, or null to train for trainer.epochs (got {trainer.max_steps})"
        )
    if trainer.max_steps is None and trainer.epochs <= 0:
        problems.append(f"trainer.epochs must be positive (got {trainer.epochs})")
    if trainer.max_length < 8:
        problems.append(f"trainer.max_length must be at least 8 tokens (got {trainer.max_length})")
    if trainer.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"trainer.precision must be auto, fp32, bf16 or fp16 (got '{trainer.precision}')")
    if not lr > 0:
        problems.append(f"optimizer.lr must be positive (got {lr})")
    if problems:
        raise FtuneError("Invalid training settings: " + "; ".join(problems) + ".")


ALLOWED_TARGET_PREFIXES = ("torch.optim.", "bitsandbytes.optim.", "transformers.", "ftune.")


def check_target(node: DictConfig, group: str) -> None:
    """Only instantiate ``_target_`` callables from trusted modules (configs are data, not code)."""
    target = node.get("_target_")
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
        raise FtuneError(
            f"The {group} config names `_target_: {target}`, which ftune will not import: only callables "
            f"under {', '.join(ALLOWED_TARGET_PREFIXES)} may be instantiated from a config. "
            f"Choose a shipped {group} (configs/{group}/) or one of those modules."
        )


