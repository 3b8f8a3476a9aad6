"""MoE fine-tuning: train a Mixture-of-Experts model's routers, its experts, or both.

``method=moe method.train=router|experts|router_experts`` trains exactly those weights of every sparse
block (ftune.moe: the router is ``mlp.gate`` and Qwen2-MoE's ``shared_expert_gate``; the experts are the
fused ``mlp.experts`` tensors and Qwen2-MoE's ``shared_expert``), and the task head of a classification
model. While a router trains, its load-balancing loss (``router_aux_loss_coef``, the model's by default)
and, for models pretrained with one (OLMoE), the router z-loss join the training loss (ftune.moe.Routing).
LoRA on the experts is ``method=lora method.target_experts=true`` instead.

Saved format: that of ``full``/``freeze`` (``adapter/weights.safetensors`` with the trained tensors under
their names in the base model), loaded over a fresh base model; merging is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ftune.config import NOT_NEGATIVE, ranged
from ftune.errors import MethodNotApplicable
from ftune.methods.base import MethodSettings, register_method
from ftune.methods.selective import SelectiveMethod

TRAIN_MODES = ("router", "experts", "router_experts")


@dataclass
class MoeSettings(MethodSettings):
    train: str = "router_experts"  # router | experts | router_experts
    router_aux_loss_coef: Optional[float] = ranged(None, NOT_NEGATIVE, "for the model's own")
    router_z_loss_coef: Optional[float] = ranged(None, NOT_NEGATIVE, "for the model's own (OLMoE 0.001, else 0)")


@register_method("moe")
class Moe(SelectiveMethod):
    """Train the routers and/or the experts of an MoE model (and a classification head)."""

    settings_cls = MoeSettings

    def check(self, model, ctx):
        from ftune.moe import is_moe, not_moe_error

        if self.settings.train not in TRAIN_MODES:
            raise MethodNotApplicable(
                f"method.train={self.settings.train} is not a mode of method=moe; choose router (the routers "
                f"only), experts (the experts' FFN weights only) or router_experts (both)."
            )
        if not is_moe(model):
            raise MethodNotApplicable(str(not_moe_error(model, "method=moe")))

    def prepare(self, model, ctx):
        from ftune.moe import expert_parameter_names, router_parameter_names

        train = self.settings.train
        self._names = set()
        if train in ("router", "router_experts"):
            self._names.update(router_parameter_names(model))
        if train in ("experts", "router_experts"):
            self._names.update(expert_parameter_names(model))
        return super().prepare(model, ctx)

    def is_trainable(self, name, model, ctx):
        return name in self._names
