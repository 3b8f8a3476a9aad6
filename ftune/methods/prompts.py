"""Prompt-learning methods through peft: trained virtual tokens, at the input or at every layer.

- ``prompt_tuning``: Prompt Tuning (Lester et al. 2021), ``num_virtual_tokens`` trained embeddings
  prepended to the input embeddings. Initialised from sampled vocabulary embeddings (``init=vocab``),
  from a text (``init=text``, ``init_text``; the run's tokenizer) or at random.
- ``prefix_tuning``: Prefix-Tuning (Li & Liang 2021), trained keys and values prepended in every
  attention layer, produced by an MLP over a small prefix embedding (reparameterisation) while
  training; the saved adapter holds the MLP's output.
- ``ptuning``: P-Tuning (Liu et al. 2021), virtual input tokens produced by a prompt encoder (an MLP or
  a bidirectional LSTM + MLP) from trained embeddings.
- ``ptuning_v2``: P-Tuning v2 (Liu et al. 2022), deep prompts: keys and values trained directly at every
  layer (prefix tuning without reparameterisation); works for classification with the task head.

None of them changes a weight, so none can be merged. Saved format: peft's own
(``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
``peft.PeftModel.from_pretrained(base, run_dir / "adapter")``; for classification it also holds the
trained task head (peft's ``modules_to_save``).

Two shims, applied to the base model (by ``prepare`` and ``load``) where needed:

- transformers 5 renamed the ``past_key_values`` argument to ``cache``; peft 0.21 looks for
  ``past_key_values`` in a classifier's forward signature before it passes a prefix, and refuses
  BERT / Llama classifiers. The shim gives the classifier's forward a ``past_key_values`` argument that
  it passes on as ``cache``.
- a decoder classifier (Llama, Qwen, GPT-2 ``*ForSequenceClassification``) finds the last real token
  from ``input_ids``; input-level prompts reach it as ``inputs_embeds`` only, and transformers then
  pools the last position, a padding token in ftune's right-padded batches. The shim pools the last
  position of the attention mask instead.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ftune.config import AT_LEAST_1, PROBABILITY, ranged
from ftune.errors import MethodNotApplicable
from ftune.methods.base import Method, MethodContext, MethodSettings, register_method
from ftune.methods.lora import PEFT_TASK, PeftMethod

PROMPT_INITS = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}


def _params(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), None) or model


def accepts_cache(model: nn.Module) -> bool:
    """Whether the model (or its backbone) takes a key/value cache, through which prefixes enter."""
    names = {"cache", "past_key_values"}
    return bool(names & _params(model.forward)) or bool(names & _params(_backbone(model).forward))


def expose_past_key_values(model: nn.Module) -> None:
    """Give a classifier's forward the ``past_key_values`` argument peft looks for, passed on as ``cache``."""
    if "past_key_values" in _params(model.forward) or getattr(model, "_ftune_pkv_shim", False):
        return
    original = model.forward
    name = "cache" if "cache" in _params(original) | _params(_backbone(model).forward) else "past_key_values"

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs[name] = past_key_values
        return original(*args, **kwargs)

    model.forward = forward
    model._ftune_pkv_shim = True


def pool_by_attention_mask(model: nn.Module) -> None:
    """Make a decoder classifier fed ``inputs_embeds`` pool its last attended position, not the last one."""
    if getattr(model, "_ftune_pool_shim", False):
        return
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    original = model.forward
    backbone = _backbone(model)

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        if input_ids is not None or inputs_embeds is None or attention_mask is None or labels is not None:
            return original(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                            labels=labels, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
        hidden = backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = model.score(hidden)
        positions = torch.arange(attention_mask.shape[1], device=logits.device)
        last = (positions * attention_mask.to(logits.device, positions.dtype)).argmax(-1)
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return SequenceClassifierOutputWithPast(logits=pooled)

    model.forward = forward
    model._ftune_pool_shim = True


def check_prompt_learning(model: nn.Module, ctx: MethodContext, name: str, uses_cache: bool) -> None:
    """The reasons a prompt-learning method cannot train this model, as MethodNotApplicable."""
    if ctx.task not in PEFT_TASK:
        raise MethodNotApplicable(f"{name} supports causal_lm and seq_cls tasks, not {ctx.task}.")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise MethodNotApplicable(f"ftune runs {name} on decoder-only and encoder-only models, not on a "
                                  f"{config.model_type} encoder-decoder.")
    if uses_cache and ctx.activation_checkpointing:
        raise MethodNotApplicable(
            f"{name} passes its trained keys and values to every layer through the attention cache, and under "
            f"activation checkpointing transformers drops that cache in training (GradientCheckpointingLayer sets "
            f"cache=None), so the prefix would silently do nothing. Set trainer.activation_checkpointing=false, or "
            f"use prompt_tuning / ptuning (input-level prompts) or lora."
        )
    if uses_cache and not accepts_cache(model):
        raise MethodNotApplicable(
            f"{name} needs a model that takes a key/value cache (past_key_values), and this {config.model_type} "
            f"model's forward has none. Use prompt_tuning / ptuning (input-level prompts) or lora."
        )


def patch_for_prompt_learning(model: nn.Module, ctx: MethodContext, uses_cache: bool) -> None:
    """The shims of the module docstring, where this model and method need them."""
    if ctx.task != "seq_cls":
        return
    if uses_cache:
        expose_past_key_values(model)
    elif isinstance(getattr(model, "score", None), nn.Module):
        pool_by_attention_mask(model)


# why prompt-learning methods are refused under trainer.distributed=fsdp (peft_generic's prompt types too)
PROMPT_FSDP = ("its few trained tensors are virtual-token embeddings (or prefix keys and values) that peft's "
               "prompt encoder joins to the input outside the transformer blocks; sharding them saves no memory "
               "and ftune does not shard that path")


class PromptLearning(PeftMethod):
    """Shared by the prompt-learning methods: checks, shims, peft save/load, no merge."""

    mergeable = False
    not_mergeable_hint = (
        "use `ftune eval` or `ftune generate`, which load the adapter on the fly (its virtual tokens are not a "
        "change of any weight)"
    )
    uses_cache: ClassVar[bool] = False  # prefix methods: trained keys/values enter through the cache

    def peft_kwargs(self, model: nn.Module, ctx: MethodContext) -> dict:
        raise NotImplementedError

    def fsdp_refusal(self):
        return PROMPT_FSDP

    def peft_config_cls(self):
        raise NotImplementedError

    def check(self, model, ctx):
        if self.settings.num_virtual_tokens < 1:
            raise MethodNotApplicable(f"method.num_virtual_tokens must be >= 1, got {self.settings.num_virtual_tokens}.")
        check_prompt_learning(model, ctx, self.name, self.uses_cache)

    def peft_config(self, model, ctx):
        try:
            return self.peft_config_cls()(task_type=PEFT_TASK[ctx.task],
                                          num_virtual_tokens=self.settings.num_virtual_tokens,
                                          **self.peft_kwargs(model, ctx))
        except ValueError as e:
            raise MethodNotApplicable(f"Invalid {self.name} settings: {e}") from None

    def prepare(self, model, ctx):
        from peft import get_peft_model

        patch_for_prompt_learning(model, ctx, self.uses_cache)
        if ctx.activation_checkpointing:  # input-level prompts only (check refuses the prefix methods)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = self.peft_config(model, ctx)
        try:
            return get_peft_model(model, config)
        except (ValueError, KeyError, AttributeError) as e:
            raise MethodNotApplicable(f"peft cannot apply {self.name} to this {model.config.model_type} model: {e}") from None

    def load(self, base_model, out_dir: Path, ctx):
        patch_for_prompt_learning(base_model, ctx, self.uses_cache)
        return super().load(base_model, out_dir, ctx)

    def merge(self, model):
        return Method.merge(self, model)


@dataclass
class PromptTuningSettings(MethodSettings):
    num_virtual_tokens: int = ranged(20, AT_LEAST_1)
    init: str = "vocab"  # vocab: embeddings of sampled vocabulary tokens | text: of init_text | random
    init_text: str | None = None  # for init=text, e.g. "Classify the sentiment of this review:"
    tokenizer: str | None = None  # for init=text; default: the run's tokenizer


@register_method("prompt_tuning")
class PromptTuning(PromptLearning):
    """Prompt Tuning (Lester et al. 2021): P trained input embeddings, P × hidden_size parameters."""

    settings_cls = PromptTuningSettings

    def check(self, model, ctx):
        s = self.settings
        if s.init not in PROMPT_INITS:
            raise MethodNotApplicable(f"method.init={s.init!r}; choose one of {', '.join(PROMPT_INITS)}.")
        if s.init == "text":
            if not s.init_text:
                raise MethodNotApplicable('method.init=text needs method.init_text="..." (the words to start from).')
            if not self.tokenizer_path(model, ctx):
                raise MethodNotApplicable(
                    "method.init=text needs the tokenizer to turn init_text into tokens, and this run does not say "
                    "where it is; set method.tokenizer=<hub id or folder>."
                )
        super().check(model, ctx)

    def tokenizer_path(self, model, ctx) -> str | None:
        return (self.settings.tokenizer or getattr(ctx, "tokenizer_path", None)
                or getattr(model, "name_or_path", None) or None)

    def peft_config_cls(self):
        from peft import PromptTuningConfig

        return PromptTuningConfig

    def peft_kwargs(self, model, ctx):
        s = self.settings
        kwargs = {"prompt_tuning_init": PROMPT_INITS[s.init]}
        if s.init == "text":
            kwargs.update(prompt_tuning_init_text=s.init_text, tokenizer_name_or_path=self.tokenizer_path(model, ctx))
        return kwargs


@dataclass
class PrefixTuningSettings(MethodSettings):
    num_virtual_tokens: int = ranged(20, AT_LEAST_1)  # prefix length
    encoder_hidden_size: int = ranged(512, AT_LEAST_1)  # the reparameterisation MLP's width (512 in Li & Liang 2021)


@register_method("prefix_tuning")
class PrefixTuning(PromptLearning):
    """Prefix-Tuning (Li & Liang 2021): per-layer prefix keys/values = MLP(prefix embedding)."""

    settings_cls = PrefixTuningSettings
    uses_cache = True

    def peft_config_cls(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig

    def peft_kwargs(self, model, ctx):
        return {"prefix_projection": True, "encoder_hidden_size": self.settings.encoder_hidden_size}


@dataclass
class PtuningSettings(MethodSettings):
    num_virtual_tokens: int = ranged(20, AT_LEAST_1)
    encoder_type: str = "MLP"  # MLP | LSTM (a bidirectional LSTM, then a 2-layer MLP, as in Liu et al. 2021)
    encoder_hidden_size: int | None = ranged(None, AT_LEAST_1, "for the model's hidden size")  # default: the model's hidden size
    encoder_num_layers: int = ranged(2, AT_LEAST_1)  # LSTM layers (the MLP encoder always has 3 linear layers in peft)
    encoder_dropout: float = ranged(0.0, PROBABILITY)


@register_method("ptuning")
class Ptuning(PromptLearning):
    """P-Tuning (Liu et al. 2021): virtual input tokens = prompt encoder(trained embeddings)."""

    settings_cls = PtuningSettings

    def check(self, model, ctx):
        if str(self.settings.encoder_type).upper() not in ("MLP", "LSTM"):
            raise MethodNotApplicable(f"method.encoder_type={self.settings.encoder_type!r}; choose MLP or LSTM.")
        super().check(model, ctx)

    def peft_config_cls(self):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig

    def peft_kwargs(self, model, ctx):
        s = self.settings
        return {"encoder_reparameterization_type": str(s.encoder_type).upper(),
                "encoder_hidden_size": s.encoder_hidden_size, "encoder_num_layers": s.encoder_num_layers,
                "encoder_dropout": s.encoder_dropout}


@dataclass
class PtuningV2Settings(MethodSettings):
    num_virtual_tokens: int = ranged(20, AT_LEAST_1)  # prompt length at every layer


@register_method("ptuning_v2")
class PtuningV2(PromptLearning):
    """P-Tuning v2 (Liu et al. 2022): deep prompts, keys and values trained directly at every layer."""

    settings_cls = PtuningV2Settings
    uses_cache = True

    def peft_config_cls(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig

    def peft_kwargs(self, model, ctx):
        return {"prefix_projection": False}
