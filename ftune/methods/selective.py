"""Methods that train a subset of the model's own weights: full, freeze (last N blocks), bitfit.

Saved format (``adapter/``): ``weights.safetensors`` holds exactly the trained tensors under their
names in the base model, and ``ftune_weights.json`` records the method and tensor names. Reloading
loads them over a fresh base model; merging is a no-op, the weights are already in place.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ftune.config import NOT_NEGATIVE, ranged
from ftune.errors import FtuneError, MethodNotApplicable
from ftune.methods.base import Method, MethodContext, register_method
from ftune.methods.unfreezing import UnfreezeSettings, UnfreezesGradually

WEIGHTS_FILE = "weights.safetensors"
INDEX_FILE = "ftune_weights.json"


def transformer_blocks(model: nn.Module, instead: str = "use method.trainable_patterns instead"
                       ) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's repeated transformer blocks; ``instead`` ends the error."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name.endswith(("layers", "layer", "h")):
            return name, module
    raise MethodNotApplicable(
        f"Could not find the transformer blocks of this {model.config.model_type} model (a ModuleList of "
        f"{n_layers} layers), so layers cannot be frozen by index; {instead}."
    )


class SelectiveMethod(Method):
    """Trains the base model's own parameters selected by ``is_trainable``."""

    mergeable = True

    def is_trainable(self, name: str, model: nn.Module, ctx: MethodContext) -> bool:
        raise NotImplementedError

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        heads = tuple(f"{h}." for h in ctx.head_names)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(heads) or self.is_trainable(name, model, ctx)
        if ctx.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "method": self.name})
        (out_dir / INDEX_FILE).write_text(json.dumps({"method": self.name, "tensors": sorted(tensors)}, indent=1))

    def load(self, base_model: nn.Module, out_dir: Path, ctx: MethodContext) -> nn.Module:
        tensors = load_file(str(Path(out_dir) / WEIGHTS_FILE))
        missing, unexpected = base_model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise FtuneError(
                f"The weights in '{out_dir}' do not fit this base model (unknown tensors such as "
                f"{unexpected[:3]}); they were trained on another model. Use the run's own model config."
            )
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        return model


@register_method("full")
class Full(SelectiveMethod):
    """Full fine-tuning: every weight is trained."""

    def is_trainable(self, name, model, ctx):
        return True


@dataclass
class FreezeSettings(UnfreezeSettings):
    # train the last N transformer blocks (with schedule=gradual: every block, one after the other)
    trainable_layers: int = ranged(2, NOT_NEGATIVE)
    trainable_patterns: list = field(default_factory=list)  # and parameters matching these globs
    train_final_norm: bool = True  # the norm after the last block


@register_method("freeze")
class Freeze(UnfreezesGradually, SelectiveMethod):
    """Partial fine-tuning: freeze everything but the last N blocks (and matching parameters).

    ``method.schedule=gradual``: every block, unfrozen one at a time from the top (ftune.methods.unfreezing).
    """

    settings_cls = FreezeSettings

    @property
    def layers(self) -> int | None:
        """The number of trained blocks; None: all of them (gradual unfreezing)."""
        return None if self.settings.schedule == "gradual" else self.settings.trainable_layers

    def check(self, model, ctx):
        s = self.settings
        if self.layers is None:
            return self.check_blocks(model)
        _, blocks = transformer_blocks(model)
        if s.trainable_layers < 0 or s.trainable_layers > len(blocks):
            raise MethodNotApplicable(
                f"method.trainable_layers={s.trainable_layers} but the model has {len(blocks)} blocks; "
                f"choose 0..{len(blocks)}."
            )
        if s.trainable_layers == 0 and not s.trainable_patterns and not ctx.head_names:
            raise MethodNotApplicable(
                "method=freeze with trainable_layers=0 and no trainable_patterns leaves nothing to train."
            )

    def prepare(self, model, ctx):
        prefix, blocks = transformer_blocks(model)
        first = len(blocks) - (len(blocks) if self.layers is None else self.layers)
        self._prefixes = tuple(f"{prefix}.{i}." for i in range(first, len(blocks)))
        return self.start_unfreezing(super().prepare(model, ctx), ctx)

    def is_trainable(self, name, model, ctx):
        s = self.settings
        if name.startswith(self._prefixes):
            return True
        if any(fnmatch.fnmatch(name, pat) for pat in s.trainable_patterns):
            return True
        # the final norm sits after the blocks: model.norm (llama), transformer.ln_f (gpt2)
        return s.train_final_norm and self.layers != 0 and name.split(".")[-2] in ("norm", "ln_f")


@register_method("bitfit")
class BitFit(SelectiveMethod):
    """BitFit (Ben Zaken et al. 2022): train only the bias terms (and the task head)."""

    def check(self, model, ctx):
        heads = tuple(f"{h}." for h in ctx.head_names)
        if not any(n.endswith(".bias") and not n.startswith(heads) for n, _ in model.named_parameters()):
            raise MethodNotApplicable(
                f"BitFit trains bias terms, but this {model.config.model_type} model has none (Llama and "
                f"Mistral layers are built without biases). Choose a method such as lora, ia3 or freeze."
            )

    def is_trainable(self, name, model, ctx):
        return name.endswith(".bias")
