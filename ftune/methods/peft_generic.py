"""Any other peft method, by name: ``method=peft method.peft_type=LOHA method.config={r:8,alpha:16}``.

``peft_type`` is a key of peft's registry (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``: LOHA, LOKR,
VERA, OFT, BOFT, FOURIERFT, LN_TUNING, ...) and ``config`` the keyword arguments of its config class.
ftune fills in what the user leaves out:

- ``task_type`` from the run (CAUSAL_LM or SEQ_CLS, which trains and saves the task head);
- ``target_modules``: peft's own per-architecture default where the method has one for this model,
  else ftune's (the attention query/value projections; the layer norms for LN_TUNING);
- ``total_step`` (ADALORA-style schedules) from the run's real number of optimizer steps;
- ``num_virtual_tokens`` = 20 for prompt-learning types.

Saved format: peft's own. The model merges (``merge_and_unload``) when the tuner's layers implement
a merge; prompt-learning types never do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ftune.errors import FtuneError, MethodNotApplicable
from ftune.methods.base import Method, MethodSettings, register_method
from ftune.methods.lora import PEFT_TASK, PeftMethod, as_targets, default_targets
from ftune.methods.prompts import check_prompt_learning, patch_for_prompt_learning

# The layer norms per architecture, LN_TUNING's targets where peft has none (peft has none for BERT).
NORM_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen3": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "bert": ["LayerNorm"],
}
CACHE_TYPES = {"PREFIX_TUNING", "CARTRIDGE"}  # prompt learning through the key/value cache


def peft_types() -> dict[str, type]:
    """peft's registry of method configs, by upper-case name."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)).upper(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def supports_merge(peft_type: str) -> bool:
    """Whether some layer class of the tuner implements ``merge`` (BaseTunerLayer's raises)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner = {str(getattr(k, "value", k)).upper(): v for k, v in PEFT_TYPE_TO_TUNER_MAPPING.items()}.get(peft_type)
    layer_cls = getattr(tuner, "tuner_layer_cls", None)
    if not isinstance(layer_cls, type):
        return False
    todo, seen = [layer_cls], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.merge is not BaseTunerLayer.merge:
            return True
        todo.extend(cls.__subclasses__())
    return False


def peft_default_targets(peft_type: str, model_type: str) -> list[str] | None:
    """target_modules to fill in: None where peft has its own default for this architecture."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = {str(getattr(k, "value", k)).upper(): v for k, v in PEFT_TYPE_TO_TUNER_MAPPING.items()}.get(peft_type)
    if model_type in (getattr(tuner, "target_module_mapping", None) or {}):
        return None
    if peft_type == "LN_TUNING":
        return list(NORM_TARGETS[model_type]) if model_type in NORM_TARGETS else None
    return default_targets(model_type)


@dataclass
class PeftSettings(MethodSettings):
    peft_type: str = "LOHA"  # a key of peft's PEFT_TYPE_TO_CONFIG_MAPPING
    config: dict[str, Any] | None = None  # keyword arguments of that type's config class
    target_modules: Any | None = None  # shortcut for config.target_modules (wins over it)


@register_method("peft")
class GenericPeft(PeftMethod):
    """Pass-through to any method in peft's registry."""

    settings_cls = PeftSettings

    def __init__(self, settings: PeftSettings):
        super().__init__(settings)
        types = peft_types()
        key = str(settings.peft_type).strip().upper().replace("-", "_")
        if key not in types:
            raise FtuneError(
                f"Unknown peft_type '{settings.peft_type}'. The methods peft knows are: {', '.join(sorted(types))} "
                f"(for example `method=peft method.peft_type=LOHA method.config={{r:8,alpha:16}}`)."
            )
        self.peft_type = key
        self.config_cls = types[key]
        from peft.config import PromptLearningConfig

        self.prompt_learning = issubclass(self.config_cls, PromptLearningConfig)
        self.uses_cache = key in CACHE_TYPES
        self.mergeable = (not self.prompt_learning) and supports_merge(key)

    def fsdp_refusal(self):
        from ftune.methods.prompts import PROMPT_FSDP

        return PROMPT_FSDP if self.prompt_learning else None

    def check(self, model, ctx):
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(self.settings.config or {}) - known)
        if unknown:
            raise FtuneError(
                f"method.config has {', '.join(unknown)}, which {self.config_cls.__name__} does not take. Its "
                f"settings are: {', '.join(sorted(k for k in known if not k.startswith('_')))}."
            )
        if self.prompt_learning:
            check_prompt_learning(model, ctx, f"peft {self.peft_type}", self.uses_cache)

    def peft_config(self, model, ctx):
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        kwargs = dict(self.settings.config or {})
        kwargs.setdefault("task_type", PEFT_TASK[ctx.task])
        if self.settings.target_modules is not None:
            kwargs["target_modules"] = as_targets(self.settings.target_modules)
        elif "target_modules" in kwargs:
            kwargs["target_modules"] = as_targets(kwargs["target_modules"])
        if "target_modules" in known and kwargs.get("target_modules") is None and not self.prompt_learning:
            targets = peft_default_targets(self.peft_type, ctx.model_type)
            if targets is not None:
                kwargs["target_modules"] = targets
        if "total_step" in known and kwargs.get("total_step") is None:
            kwargs["total_step"] = ctx.total_steps
        if self.prompt_learning and kwargs.get("num_virtual_tokens") is None:
            kwargs["num_virtual_tokens"] = 20
        try:
            return self.config_cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise MethodNotApplicable(f"Invalid settings for peft {self.peft_type}: {e}") from None

    def prepare(self, model, ctx):
        from peft import get_peft_model

        if self.prompt_learning:
            patch_for_prompt_learning(model, ctx, self.uses_cache)
        if ctx.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = self.peft_config(model, ctx)
        try:
            return get_peft_model(model, config)
        except (ValueError, KeyError, TypeError) as e:
            raise MethodNotApplicable(
                f"peft {self.peft_type} cannot be applied to this {ctx.model_type} model: {e}. Name the layers with "
                f"method.target_modules=[...] or adjust method.config."
            ) from None

    def load(self, base_model, out_dir, ctx):
        if self.prompt_learning:
            patch_for_prompt_learning(base_model, ctx, self.uses_cache)
        return super().load(base_model, out_dir, ctx)

    def merge(self, model):
        if not self.mergeable:
            return Method.merge(self, model)
        try:
            return model.merge_and_unload()
        except NotImplementedError as e:
            raise FtuneError(f"peft {self.peft_type} cannot merge this model's layers ({e}); {self.not_mergeable_hint}.") from None
