"""LoRA and QLoRA through peft.

peft does the work; ftune picks the target modules per architecture and keeps the task head
trainable (peft's SEQ_CLS task type puts ``classifier``/``score`` in ``modules_to_save``).
Saved format: peft's own (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
``peft.PeftModel.from_pretrained(base, run_dir / "adapter")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ftune.errors import MethodNotApplicable
from ftune.methods.base import Method, MethodContext, MethodSettings, register_method

PEFT_TASK = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


class PeftMethod(Method):
    """A method that is a peft config: prepare = get_peft_model, save/load = peft's format."""

    def peft_config(self, model: nn.Module, ctx: MethodContext):
        raise NotImplementedError

    def prepare(self, model, ctx):
        from peft import get_peft_model

        if ctx.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, self.peft_config(model, ctx))

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))

    def load(self, base_model, out_dir: Path, ctx):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(out_dir))

    def merge(self, model):
        return model.merge_and_unload()


@dataclass
class LoraSettings(MethodSettings):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # None: peft's default for the architecture (query/value projections); a list of module
    # names; or "all-linear" for every linear layer except the output head.
    target_modules: Optional[Any] = None
    bias: str = "none"
    modules_to_save: Optional[list] = None
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: Any = True  # True (Kaiming A, zero B) | "gaussian" | "pissa" | "olora" | ...


@register_method("lora")
class Lora(PeftMethod):
    """LoRA (Hu et al. 2021): low-rank updates B·A on the target weights."""

    settings_cls = LoraSettings
    mergeable = True

    def lora_kwargs(self, ctx: MethodContext) -> dict:
        s = self.settings
        target = s.target_modules
        if isinstance(target, (list, tuple)):
            target = list(target)
        return dict(
            task_type=PEFT_TASK[ctx.task],
            r=s.r,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=target,
            bias=s.bias,
            modules_to_save=list(s.modules_to_save) if s.modules_to_save else None,
            use_dora=s.use_dora,
            use_rslora=s.use_rslora,
            init_lora_weights=s.init_lora_weights,
        )

    def peft_config(self, model, ctx):
        from peft import LoraConfig

        try:
            return LoraConfig(**self.lora_kwargs(ctx))
        except ValueError as e:
            raise MethodNotApplicable(f"Invalid LoRA settings: {e}") from None


@register_method("qlora")
class QLora(Lora):
    """QLoRA (Dettmers et al. 2023): LoRA on an NF4 4-bit quantized, frozen base model."""

    def prepare(self, model, ctx):
        from peft import get_peft_model, prepare_model_for_kbit_training

        from ftune.models import quantize_4bit

        model = quantize_4bit(model, ctx.compute_dtype, ctx.device, skip=ctx.head_names)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=ctx.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return get_peft_model(model, self.peft_config(model, ctx))

    def load(self, base_model, out_dir, ctx):
        from ftune.models import quantize_4bit

        base_model = quantize_4bit(base_model, ctx.compute_dtype, ctx.device, skip=ctx.head_names)
        return super().load(base_model, out_dir, ctx)

    def merge(self, model):
        raise MethodNotApplicable(
            "A QLoRA model must be merged onto full-precision base weights, not into the 4-bit ones; "
            "`ftune merge` reloads the base in full precision and applies the adapter there."
        )
