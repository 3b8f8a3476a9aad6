"""MAM and UniPELT: mixtures of bottleneck adapters, prefix tuning and LoRA, implemented in ftune.

- ``mam`` (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning"): prefix
  tuning on every self-attention plus a *parallel* adapter on every FFN, whose output is scaled by
  ``scaling`` (s = 4 in the paper) and added to the FFN's output: ``FFN(x) + s * up(act(down(x)))``.
- ``unipelt`` (Mao et al. 2022): LoRA on the query and value projections, prefix tuning, and a
  bottleneck adapter after the FFN, each scaled by its own gate ``sigmoid(w·x + b)`` computed from
  that submodule's input ``x``. The paper's code averages each gate over the sequence; ftune gates
  every token separately, which keeps a causal LM causal (a sequence mean would let later tokens
  steer earlier predictions) and makes the result independent of padding and batch composition.
  The LoRA gate multiplies the usual ``alpha / r`` scaling; the prefix gate multiplies the prefix
  keys and values, as in the paper.

Prefix tuning
-------------
A prefix is ``prefix_length`` learned key and value vectors per layer and key/value head,
prepended to the keys and values of every self-attention call; every query may attend to them.
ftune prepends them where all supported architectures meet in transformers 5: the call of the
attention function (``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation)``),
after the q/k/v projections, rotary embeddings, q/k norms and the KV-cache update. Each prefixed
attention module gets a read-through view of the model config whose ``_attn_implementation`` is
``"ftune_prefix"``; that registered function adds the prefix, widens the attention mask by
always-visible columns and hands over to the model's own implementation (``sdpa`` or ``eager``).
The prefix is never written to the KV cache, so cached generation, padded batches and activation
checkpointing need nothing special. As in peft's prefix tuning, rotary embeddings are not applied
to the prefix keys. Gated prefixes (UniPELT) are computed with explicit (eager-style) attention
math, since a per-query gate on the keys cannot be expressed as an SDPA call.

Parameters are trained directly (no reparameterisation MLP) and start at N(0, 0.02²). Unlike the
adapters, a prefix changes the model's outputs from the start: its keys take some attention mass.
Saved format: see :mod:`ftune.methods.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from ftune.config import AT_LEAST_1, NOT_NEGATIVE, POSITIVE, PROBABILITY, ranged
from ftune.errors import MethodNotApplicable
from ftune.methods.adapters import (
    ArchSpec,
    BottleneckAdapter,
    InjectedMethod,
    add_parallel_adapter,
    add_sequential_adapter,
    bottleneck_size,
    head_dims,
    linear_features,
)
from ftune.methods.base import MethodSettings, register_method

PREFIX_ATTENTION = "ftune_prefix"
PREFIX_IMPLEMENTATIONS = ("eager", "sdpa")
PREFIX_INIT_STD = 0.02


# --- prefix tuning --------------------------------------------------------------------------------
class PrefixKV(nn.Module):
    """One layer's prefix: ``key`` and ``value`` of shape (kv_heads, length, head_dim), optionally gated."""

    def __init__(self, length: int, kv_heads: int, head_dim: int, gate_dim: int | None = None):
        super().__init__()
        self.key = nn.Parameter(torch.randn(kv_heads, length, head_dim) * PREFIX_INIT_STD)
        self.value = nn.Parameter(torch.randn(kv_heads, length, head_dim) * PREFIX_INIT_STD)
        self.gate = nn.Linear(gate_dim, 1) if gate_dim else None
        self._gate_value: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def expanded(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (batch, kv_heads, length, head_dim)."""
        return tuple(p.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1) for p in (self.key, self.value))

    def gate_hook(self, module: nn.Module, args, kwargs) -> None:
        """Forward pre-hook on the attention module: compute the per-token gate from its input."""
        hidden = args[0] if args else kwargs["hidden_states"]
        gate = torch.sigmoid(self.gate(hidden.to(self.gate.weight.dtype)))  # (batch, q_len, 1)
        # (batch, 1, q_len, 1) broadcasts over heads and keys; in the attention's dtype
        self._gate_value = gate.unsqueeze(1).to(hidden.dtype)

    def take_gate(self) -> torch.Tensor | None:
        gate, self._gate_value = self._gate_value, None
        return gate


class _PrefixConfigView:
    """The model config as one attention module sees it: everything reads through, except that
    ``_attn_implementation`` dispatches to :func:`prefix_attention`. Writes go to the real config."""

    _attn_implementation = PREFIX_ATTENTION

    def __init__(self, config, prefix: PrefixKV):
        self.__dict__.update(base=config, prefix=prefix)

    def __getattr__(self, name: str):
        # dunders (deepcopy, pickling) must not resolve to the config's own
        if name.startswith("__") or "base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["base"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.__dict__["base"], name, value)


def extend_mask(
    mask: torch.Tensor | None, prefix_len: int, q_len: int, kv_len: int, is_causal: bool, device
) -> torch.Tensor | None:
    """The attention mask with ``prefix_len`` always-visible key columns in front.

    ``mask`` is what the model built for its implementation: None, a boolean mask (True = attend) or
    an additive float mask, shaped (batch, 1 or heads, q_len, kv_len).
    """
    if mask is None:
        if not is_causal or q_len == 1:
            return None
        # sdpa would use is_causal, aligned top-left (and crop the keys to q_len): spell it out instead
        q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
    fill = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], prefix_len), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    prefix_len: int = 0,
    gate: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain torch ops; ``gate`` (batch, 1, q_len, 1) scales the first
    ``prefix_len`` keys and values separately for every query."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if gate is not None:  # q·(g k) = g (q·k)
        scores = torch.cat([scores[..., :prefix_len] * gate, scores[..., prefix_len:]], dim=-1)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    weights = probs
    if gate is not None:  # Σ p (g v) = Σ (g p) v
        weights = torch.cat([probs[..., :prefix_len] * gate, probs[..., prefix_len:]], dim=-1)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, probs


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The ``"ftune_prefix"`` attention function: prepend the module's prefix, then attend."""
    view: _PrefixConfigView = module.config
    prefix: PrefixKV = view.prefix
    implementation = view.base._attn_implementation
    if implementation not in PREFIX_IMPLEMENTATIONS:
        raise MethodNotApplicable(_implementation_message(implementation))
    q_len, kv_len = query.shape[2], key.shape[2]
    prefix_key, prefix_value = prefix.expanded(query.shape[0], key.dtype)
    key = torch.cat([prefix_key, key], dim=2)
    value = torch.cat([prefix_value, value], dim=2)
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:  # eager never masks by itself; sdpa treats a missing mask as causal
        is_causal = implementation == "sdpa" and getattr(module, "is_causal", True)
    mask = extend_mask(attention_mask, prefix.length, q_len, kv_len, is_causal, query.device)
    gate = prefix.take_gate()
    if implementation == "sdpa" and gate is None:
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=is_causal, **kwargs)
    return eager_attention(module, query, key, value, mask, prefix_len=prefix.length, gate=gate, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)


def _implementation_message(implementation: str) -> str:
    return (
        f"Prefix tuning in ftune works with the attention implementations "
        f"{' and '.join(PREFIX_IMPLEMENTATIONS)}, but this model uses '{implementation}'. "
        f"Set `model.attn_implementation=sdpa`, or method.prefix_length=0 to train without a prefix."
    )


def check_prefix_support(model: nn.Module) -> None:
    """Raise MethodNotApplicable if the model's attention implementation cannot take a prefix."""
    implementation = model.config._attn_implementation
    if implementation not in PREFIX_IMPLEMENTATIONS:
        raise MethodNotApplicable(_implementation_message(implementation))


def add_prefix(block: nn.Module, spec: ArchSpec, config, length: int, gated: bool = False) -> PrefixKV:
    """Give ``block``'s self-attention a prefix of ``length`` key/value vectors."""
    attention = block.get_submodule(spec.attention)
    _, kv_heads, head_dim = head_dims(config)
    prefix = PrefixKV(length, kv_heads, head_dim, gate_dim=config.hidden_size if gated else None)
    attention.config = _PrefixConfigView(attention.config, prefix)
    if gated:
        attention.register_forward_pre_hook(prefix.gate_hook, with_kwargs=True)
    return prefix


# --- LoRA --------------------------------------------------------------------------------------------
class LoraDelta(nn.Module):
    """``delta(x) = gate(x) * alpha / r * B(A(dropout(x)))``, added to a projection's output.

    ``pad`` places the delta in a slice of the output (GPT-2's fused q/k/v projection). ``B`` starts
    at zero, so the projection is unchanged at first; ``gate`` is 1 unless ``gated`` (UniPELT).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        gated: bool = False,
        pad: tuple[int, int] = (0, 0),
    ):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        self.gate = nn.Linear(in_features, 1) if gated else None
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(self.dropout(h))) * self.scaling
        if self.gate is not None:
            delta = delta * torch.sigmoid(self.gate(h))
        return delta.to(x.dtype)

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the projection: add the delta of its input."""
        return output + F.pad(self(args[0]), self.pad)


def add_lora(
    block: nn.Module, spec: ArchSpec, which: str, r: int, alpha: float, dropout: float, gated: bool
) -> LoraDelta:
    """LoRA on ``block``'s query (``which="q"``) or value (``"v"``) projection."""
    target = block.get_submodule(spec.query if which == "q" else spec.value)
    in_features, out_features = linear_features(target)
    pad = (0, 0)
    if spec.fused_qkv:  # output is [q | k | v]
        third = out_features // 3
        index = 0 if which == "q" else 2
        pad, out_features = (index * third, (2 - index) * third), third
    lora = LoraDelta(in_features, out_features, r, alpha, dropout, gated=gated, pad=pad)
    target.register_forward_hook(lora.hook)
    return lora


# --- the methods -------------------------------------------------------------------------------------
@dataclass
class MamSettings(MethodSettings):
    prefix_length: int = ranged(30, NOT_NEGATIVE)  # prefix vectors per layer (l = 30 in the paper); 0 = no prefix
    reduction_factor: int = ranged(2, AT_LEAST_1)  # parallel-adapter bottleneck = hidden_size // reduction_factor ...
    bottleneck_size: int | None = ranged(None, AT_LEAST_1, "for hidden_size // reduction_factor")  # (512 on a 1024-wide model in the paper)
    scaling: float = ranged(4.0, POSITIVE)  # s, the parallel adapter's output scale
    non_linearity: str = "relu"


class PrefixMixture(InjectedMethod):
    """A mixture whose prefixes (prefix_length > 0) need an attention implementation that supports them."""

    def validate(self, model, ctx):
        if self.settings.prefix_length:
            check_prefix_support(model)


@register_method("mam")
class Mam(PrefixMixture):
    """Mix-and-Match adapter: prefix tuning on attention + a scaled parallel adapter on the FFN."""

    settings_cls = MamSettings

    def inject_block(self, block, spec, config):
        s = self.settings
        modules = nn.ModuleDict()
        if s.prefix_length:
            modules["prefix"] = add_prefix(block, spec, config, s.prefix_length)
        size = bottleneck_size(s.bottleneck_size, s.reduction_factor, config.hidden_size)
        modules["ffn_adapter"] = BottleneckAdapter(config.hidden_size, size, s.non_linearity, scale=s.scaling)
        add_parallel_adapter(block, spec, modules["ffn_adapter"])
        return modules


@dataclass
class UniPeltSettings(MethodSettings):
    prefix_length: int = ranged(10, NOT_NEGATIVE)  # 0 = no prefix
    lora_r: int = ranged(8, AT_LEAST_1)
    lora_alpha: int = ranged(16, POSITIVE)
    lora_dropout: float = ranged(0.0, PROBABILITY)
    reduction_factor: int = ranged(16, AT_LEAST_1)  # adapter bottleneck = hidden_size // reduction_factor ...
    bottleneck_size: int | None = ranged(None, AT_LEAST_1, "for hidden_size // reduction_factor")
    non_linearity: str = "relu"


@register_method("unipelt")
class UniPelt(PrefixMixture):
    """UniPELT: gated LoRA (query, value) + gated prefix tuning + a gated adapter after the FFN."""

    settings_cls = UniPeltSettings

    def inject_block(self, block, spec, config):
        s = self.settings
        modules = nn.ModuleDict()
        if s.prefix_length:
            modules["prefix"] = add_prefix(block, spec, config, s.prefix_length, gated=True)
        for which in ("q", "v"):
            modules[f"lora_{which}"] = add_lora(
                block, spec, which, s.lora_r, s.lora_alpha, s.lora_dropout, gated=True
            )
        size = bottleneck_size(s.bottleneck_size, s.reduction_factor, config.hidden_size)
        modules["ffn_adapter"] = BottleneckAdapter(config.hidden_size, size, s.non_linearity, gated=True)
        add_sequential_adapter(block, spec.ffn_output, modules["ffn_adapter"])
        return modules


__all__ = [
    "LoraDelta",
    "Mam",
    "MamSettings",
    "PrefixKV",
    "UniPelt",
    "UniPeltSettings",
    "add_lora",
    "add_prefix",
    "prefix_attention",
]
