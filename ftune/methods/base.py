"""The method interface and registry.

A method family is one class that turns a pretrained model into a model to fine-tune and says what
to train, save and merge. The training loop only talks to this interface, so a new method is one
file with a registered class, one YAML under ``configs/method/`` and one row in the test table.

Hooks, in the order the trainer calls them::

    settings = MySettings(...)                   # validated from configs/method/<name>.yaml
    method.check(model, ctx)                     # raise MethodNotApplicable with a reason
    model = method.prepare(model, ctx)           # wrap / freeze / inject; only trainable params require grad
    groups = method.param_groups(model, lr)      # optimizer parameter groups (LoRA+ overrides), all made up
                                                 # front: a parameter frozen now but trained later (gradual
                                                 # unfreezing) is in a group and gets no grad until then
    method.fsdp_refusal()                        # why it cannot train sharded (trainer.distributed=fsdp), or None
    method.header_lines(total_steps)             # lines for the run header (e.g. the unfreezing schedule)
    ... per micro-batch: loss = task loss + method.extra_loss(model, batch, outputs, step)
    ... per optimizer step: method.after_backward(model, step) before optimizer.step(),
                            method.after_step(model, step) after it, before zero_grad() (it may
                            change which parameters require grad: the next step trains those)
    ... per logged row of metrics.jsonl: row.update(method.row_metrics(steps_done))
    method.state_dict() / load_state_dict(state)  # checkpointed; on resume loaded before the checkpoint's
                                                  # trainable tensors are compared with the model's
    method.save(model, run_dir / "adapter")      # what to keep
    model = method.load(base_model, adapter_dir, ctx)   # reload for eval / generate / resume
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ftune.config import POSITIVE, ranged
from ftune.errors import FtuneError, MethodNotApplicable
from ftune.registry import registrar, settings_from


@dataclass
class MethodSettings:
    """Settings every method YAML carries; subclasses add their own fields.

    The defaults that count are the method's YAML (``configs/method/<name>.yaml``): ``build_method``
    starts from it, so the CLI and the Python API agree; the values here only give types and a
    fallback for a method registered without a YAML.
    """

    name: str = "???"
    lr: float = ranged(1e-4, POSITIVE)  # the learning rate this method works well with; optimizer.lr defaults to it


@dataclass
class MethodContext:
    """What a method needs to know about the run it is applied in."""

    task: str  # "causal_lm" or "seq_cls"
    model_type: str  # transformers config.model_type, e.g. "llama", "gpt2", "bert"
    head_names: list[str] = field(default_factory=list)  # task-head modules that are always trained
    total_steps: int = 0  # optimizer steps of the real schedule
    steps_per_epoch: int = 0  # optimizer steps of one pass over the training data
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: torch.dtype = torch.float32
    activation_checkpointing: bool = False
    tokenizer_path: str | None = None  # the run's tokenizer (hub id or folder); prompt_tuning's init=text reads it
    report: dict[str, Any] = field(default_factory=dict)  # facts for the run header and metrics.json


class Method:
    """Base class of every method family. Subclasses set ``settings_cls`` and override hooks."""

    settings_cls: ClassVar[type[MethodSettings]] = MethodSettings
    mergeable: ClassVar[bool] = False
    not_mergeable_hint: ClassVar[str] = (
        "use `ftune eval` or `ftune generate`, which load the adapter on the fly"
    )

    def __init__(self, settings: MethodSettings):
        self.settings = settings

    @property
    def name(self) -> str:
        return self.settings.name

    # --- building -------------------------------------------------------------------------
    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        """Raise MethodNotApplicable (saying why) if this method cannot fine-tune ``model``."""

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        """Return the model to train, with exactly the method's parameters requiring grad."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; by default every trainable parameter at ``lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def fsdp_refusal(self) -> str | None:
        """Why this method cannot train with its parameters sharded by FSDP2 (``trainer.distributed=fsdp``),
        as the middle of the error paragraph; None when it can."""
        return None

    # --- training hooks -------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, batch: dict, outputs: Any, step: int) -> torch.Tensor | None:
        """An extra loss term added to the task loss (distillation, EWC, ...); None for none.

        For a causal LM ``outputs.logits`` holds only the positions that have a target
        (``1 x targets x vocab``, in order; see ``ftune.evaluate.TargetLogits``)."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called once per optimizer step, after backward and gradient clipping."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called once per optimizer step, after optimizer.step(), before zero_grad()."""

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        """Values added to each training row of metrics.jsonl (e.g. ``unfrozen_blocks``); {} for none."""
        return {}

    def header_lines(self, total_steps: int) -> list[str]:
        """Lines the run header prints about this method's schedule; [] for none."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Method state that a checkpoint must hold to resume exactly (beyond the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; it may change which parameters require grad (gradual unfreezing)."""

    # --- outputs --------------------------------------------------------------------------
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained weights to ``out_dir`` in the method's documented format."""
        raise NotImplementedError

    def load(self, base_model: nn.Module, out_dir: Path, ctx: MethodContext) -> nn.Module:
        """Rebuild the trained model from a fresh base model and what ``save`` wrote."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain transformers model with the method folded into its weights."""
        raise FtuneError(
            f"Method '{self.name}' cannot be merged into the base weights: its trained parts are "
            f"not a change of existing weights. Instead, {self.not_mergeable_hint}."
        )


METHODS: dict[str, type[Method]] = {}


register_method = registrar(METHODS, "method")  # @register_method("name"): a Method subclass under one or more names


def method_yaml_defaults(name: str) -> dict[str, Any]:
    """The settings of ``configs/method/<name>.yaml``, the defaults of ``method=<name>``; {} if none."""
    from omegaconf import OmegaConf

    from ftune.config import config_dir

    path = config_dir() / "method" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}


def build_method(method_cfg: Any) -> Method:
    """Validate a method config (an OmegaConf node or dict) and return the Method for it.

    Settings the config leaves out take the values of the method's YAML, as ``method=<name>`` would.
    """
    from omegaconf import OmegaConf

    import ftune.methods  # noqa: F401  (registers every method family)

    raw = OmegaConf.to_container(method_cfg, resolve=True) if not isinstance(method_cfg, dict) else dict(method_cfg)
    name = raw.get("name")
    if name not in METHODS:
        raise FtuneError(
            f"Unknown method '{name}'. Choose one of: {', '.join(sorted(METHODS))} "
            f"(for example `ftune train method=lora`)."
        )
    cls = METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.settings_cls)}
    from ftune.methods.unfreezing import SCHEDULE_KEYS, unsupported

    stray = [k for k in SCHEDULE_KEYS if k in raw and k not in fields]
    if stray:
        raise unsupported(name, stray[0])
    return cls(settings_from(cls.settings_cls, method_yaml_defaults(name), raw, "method", name))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # packed two 4-bit values per byte
            n = int(p.quant_state.shape.numel()) if getattr(p, "quant_state", None) is not None else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "MethodNotApplicable",
    "MethodSettings",
    "build_method",
    "register_method",
    "trainable_parameters",
]
