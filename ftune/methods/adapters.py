"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), implemented in ftune itself.

A bottleneck adapter maps a hidden state ``h`` to ``h + up(act(down(h)))``. ``up`` starts at zero, so a
freshly prepared model computes exactly what the base model computes. ftune injects the adapters
with forward hooks on the model's own modules and keeps the new modules in one ``ftune`` ModuleDict
per transformer block, so no base parameter is renamed or replaced:

- ``adapter_houlsby``: an adapter on the attention output projection and one on the FFN output of
  every block, plus the block's two layer norms trained.
- ``adapter_pfeiffer``: one adapter on the FFN output of every block.

Both apply the adapter to the sublayer's output before the block's own residual connection (and,
for BERT, before its post-LayerNorm). ``ftune.methods.mixtures`` builds MAM and UniPELT from the
same pieces (:class:`BottleneckAdapter`, :class:`InjectedMethod`, :data:`ARCHS`).

Saved format (the ``adapter/`` folder of a run), shared by all four methods::

    ftune_adapter.json         {"format": "ftune-adapter", "version": 1, "method": "adapter_houlsby",
                                "settings": {...the method YAML, validated...}, "model_type": "llama",
                                "tensors": ["model.layers.0.ftune.ffn_adapter.down.weight", ...]}
    adapter_model.safetensors  exactly the trained tensors, under their names in the prepared model:
                               the method's modules (``<blocks>.<i>.ftune.<part>.<param>``), the task
                               head (``score.weight``, ``classifier.*``) and, for Houlsby, the
                               block layer norms (``model.layers.0.input_layernorm.weight``, ...)

``load`` rebuilds the modules from the saved settings on a fresh base model of the same
``model_type`` and loads the tensors, which reproduces the trained model's outputs exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftune.config import AT_LEAST_1, ranged
from ftune.errors import FtuneError, MethodNotApplicable
from ftune.methods.base import Method, MethodContext, MethodSettings, register_method

WEIGHTS_FILE = "adapter_model.safetensors"
INDEX_FILE = "ftune_adapter.json"
FORMAT = "ftune-adapter"
CONTAINER = "ftune"  # name of the ModuleDict that holds a block's injected modules
TASKS = ("causal_lm", "seq_cls")


# --- architectures ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one transformer block live, as module paths relative to the block."""

    blocks: str  # the ModuleList of blocks, relative to ``model.base_model``
    attention: str  # the self-attention module (its ``config`` is swapped for prefix tuning)
    attn_output: str  # its output projection: output = the attention sublayer's output
    ffn_input: str  # a module whose first input is the FFN's input
    ffn_output: str  # a module whose output is the FFN's output, before the residual
    norms: tuple[str, ...]  # the layer norms around the two sublayers
    query: str  # query projection (LoRA)
    value: str  # value projection (LoRA)
    fused_qkv: bool = False  # query/key/value are thirds of one projection (GPT-2's c_attn)


_LLAMA = ArchSpec(
    blocks="layers",
    attention="self_attn",
    attn_output="self_attn.o_proj",
    ffn_input="mlp",
    ffn_output="mlp",
    norms=("input_layernorm", "post_attention_layernorm"),
    query="self_attn.q_proj",
    value="self_attn.v_proj",
)
_GPT2 = ArchSpec(
    blocks="h",
    attention="attn",
    attn_output="attn.c_proj",
    ffn_input="mlp",
    ffn_output="mlp",
    norms=("ln_1", "ln_2"),
    query="attn.c_attn",
    value="attn.c_attn",
    fused_qkv=True,
)
_BERT = ArchSpec(
    blocks="encoder.layer",
    attention="attention.self",
    attn_output="attention.output.dense",
    ffn_input="intermediate",
    ffn_output="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    query="attention.self.query",
    value="attention.self.value",
)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
    "bert": _BERT,
}


def arch_spec(model: nn.Module, method: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``; MethodNotApplicable naming the supported types otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise MethodNotApplicable(
            f"Method '{method}' does not know where to put its modules in a '{model_type}' model; it "
            f"supports the model types {', '.join(sorted(ARCHS))}. Choose one of those models, or a peft "
            f"method such as lora."
        )
    return ARCHS[model_type]


def transformer_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The ModuleList of transformer blocks of a (causal-LM or sequence-classification) model."""
    return model.base_model.get_submodule(spec.blocks)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (GPT-2)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    raise MethodNotApplicable(f"Expected a linear layer, found {type(module).__name__}.")


def head_dims(config) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


# --- the adapter module -----------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``delta(x) = scale * gate(x) * up(act(down(x)))``, with ``up`` initialised to zero.

    ``gate(x) = sigmoid(w·x + b)`` per token when ``gated`` (UniPELT), else 1. The adapter computes in
    its own dtype (float32 on a half-precision base) and returns the input's dtype. Its hook methods
    are bound methods so that ``copy.deepcopy(model)`` re-points them at the copied adapter.
    """

    def __init__(
        self, dim: int, bottleneck: int, non_linearity: str, scale: float = 1.0, gated: bool = False
    ):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale
        self.gate = nn.Linear(dim, 1) if gated else None
        self._ffn_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution (to be added to a hidden state), not the sum."""
        h = x.to(self.down.weight.dtype)
        delta = self.up(self.act(self.down(h))) * self.scale
        if self.gate is not None:
            delta = delta * torch.sigmoid(self.gate(h))
        return delta.to(x.dtype)

    def sequential_hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: a sublayer's output ``h`` becomes ``h + delta(h)``."""
        return output + self(output)

    def stash_input_hook(self, module: nn.Module, args) -> None:
        """Forward pre-hook on the FFN's first module: remember the FFN input for ``parallel_hook``."""
        self._ffn_input = args[0]

    def parallel_hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the FFN's last module: ``FFN(x)`` becomes ``FFN(x) + delta(x)``."""
        x, self._ffn_input = self._ffn_input, None
        return output + self(x)


def add_sequential_adapter(block: nn.Module, path: str, adapter: BottleneckAdapter) -> None:
    """Apply ``adapter`` to the output of ``block.<path>``."""
    block.get_submodule(path).register_forward_hook(adapter.sequential_hook)


def add_parallel_adapter(block: nn.Module, spec: ArchSpec, adapter: BottleneckAdapter) -> None:
    """Add ``adapter(ffn_input)`` to the FFN output (He et al. 2022's parallel adapter)."""
    block.get_submodule(spec.ffn_input).register_forward_pre_hook(adapter.stash_input_hook)
    block.get_submodule(spec.ffn_output).register_forward_hook(adapter.parallel_hook)


def bottleneck_size(bottleneck: int | None, reduction_factor: int, hidden: int) -> int:
    """An explicit bottleneck size, else ``hidden // reduction_factor`` (at least 1)."""
    return bottleneck if bottleneck else max(1, hidden // reduction_factor)


# --- the method base class ---------------------------------------------------------------------
class InjectedMethod(Method):
    """A method that adds new modules to every transformer block and trains only those (and the head).

    Subclasses implement ``inject_block`` (build the block's modules and register their hooks) and may
    override ``validate`` (settings checks) and ``extra_trainable`` (base parameters to train too).
    """

    mergeable: ClassVar[bool] = False

    # --- hooks for subclasses -------------------------------------------------------------------
    def validate(self, model: nn.Module, ctx: MethodContext) -> None:
        """Raise MethodNotApplicable for settings that cannot work on ``model``."""

    def inject_block(self, block: nn.Module, spec: ArchSpec, config) -> nn.ModuleDict:
        """Build one block's modules, register their hooks on ``block`` and return them."""
        raise NotImplementedError

    def extra_trainable(self, block: nn.Module, spec: ArchSpec) -> list[nn.Module]:
        """Base modules of ``block`` whose parameters are trained as well."""
        return []

    # --- Method interface -----------------------------------------------------------------------
    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        spec = arch_spec(model, self.name)
        if ctx.task not in TASKS:
            raise MethodNotApplicable(
                f"Method '{self.name}' supports the tasks {', '.join(TASKS)}, not '{ctx.task}'."
            )
        if any(hasattr(block, CONTAINER) for block in transformer_blocks(model, spec)):
            raise MethodNotApplicable(
                f"This model already carries ftune adapter modules; '{self.name}' needs a fresh base model."
            )
        nl = getattr(self.settings, "non_linearity", None)
        if nl is not None and nl not in ACTIVATIONS:
            raise MethodNotApplicable(
                f"method.non_linearity='{nl}' is unknown; choose one of {', '.join(ACTIVATIONS)}."
            )
        for key in ("reduction_factor", "bottleneck_size", "prefix_length", "lora_r"):
            value = getattr(self.settings, key, None)
            minimum = 0 if key == "prefix_length" else 1
            if value is not None and value < minimum:
                raise MethodNotApplicable(f"method.{key} must be at least {minimum}, got {value}.")
        self.validate(model, ctx)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        self.check(model, ctx)
        spec = arch_spec(model, self.name)
        model.requires_grad_(False)
        ref = next(model.parameters())
        # train the new modules in float32 even on a half-precision base, as peft does
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        for block in transformer_blocks(model, spec):
            device = next(block.parameters()).device
            modules = self.inject_block(block, spec, model.config).to(device=device, dtype=dtype)
            block.add_module(CONTAINER, modules)  # new modules require grad by default
            for module in self.extra_trainable(block, spec):
                module.requires_grad_(True)
        for name in ctx.head_names:
            model.get_submodule(name).requires_grad_(True)
        if ctx.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "method": self.name})
        index = {
            "format": FORMAT,
            "version": 1,
            "method": self.name,
            "settings": dataclasses.asdict(self.settings),
            "model_type": model.config.model_type,
            "tensors": sorted(tensors),
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))

    def load(self, base_model: nn.Module, out_dir: Path, ctx: MethodContext) -> nn.Module:
        out_dir = Path(out_dir)
        if not (out_dir / INDEX_FILE).exists():
            raise FtuneError(
                f"'{out_dir}' holds no {INDEX_FILE}, so it was not saved by method '{self.name}'. "
                f"Point at the run's adapter/ folder, or use the method the run was trained with."
            )
        index = json.loads((out_dir / INDEX_FILE).read_text())
        if index.get("method") != self.name:
            raise FtuneError(
                f"The adapter in '{out_dir}' was trained with method '{index.get('method')}', not "
                f"'{self.name}'; load it with `method={index.get('method')}`."
            )
        model_type = base_model.config.model_type
        if index.get("model_type") != model_type:
            raise FtuneError(
                f"The adapter in '{out_dir}' was trained on a '{index.get('model_type')}' model, but the "
                f"base model is a '{model_type}' model. Use the run's own model config."
            )
        # rebuild with the settings the adapter was trained with, whatever the current YAML says
        fields = {f.name for f in dataclasses.fields(self.settings_cls)}
        settings = self.settings_cls(**{k: v for k, v in index["settings"].items() if k in fields})
        model = type(self)(settings).prepare(base_model, ctx)

        tensors = load_file(str(out_dir / WEIGHTS_FILE))
        params = dict(model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        unknown = sorted(set(tensors) - set(params))
        missing = sorted(expected - set(tensors))
        mismatched = sorted(n for n in set(tensors) & set(params) if tensors[n].shape != params[n].shape)
        if unknown or missing or mismatched:
            raise FtuneError(
                f"The adapter in '{out_dir}' does not fit this base model (unknown tensors: {unknown[:3]}, "
                f"missing: {missing[:3]}, other shapes: {mismatched[:3]}); it was trained on another model. "
                f"Use the run's own model config."
            )
        model.load_state_dict(tensors, strict=False)
        return model


# --- Houlsby and Pfeiffer ------------------------------------------------------------------------
@dataclass
class BottleneckSettings(MethodSettings):
    reduction_factor: int = ranged(16, AT_LEAST_1)  # bottleneck = hidden_size // reduction_factor ...
    bottleneck_size: int | None = ranged(None, AT_LEAST_1, "for hidden_size // reduction_factor")
    non_linearity: str = "relu"  # relu | gelu | swish | silu | tanh


@dataclass
class HoulsbySettings(BottleneckSettings):
    non_linearity: str = "swish"
    train_layer_norms: bool = True  # Houlsby et al. train the block's layer norms with the adapters


@register_method("adapter_houlsby")
class HoulsbyAdapter(InjectedMethod):
    """Houlsby et al. 2019: adapters after the attention and the FFN of every block, layer norms trained."""

    settings_cls = HoulsbySettings

    def inject_block(self, block, spec, config):
        s = self.settings
        size = bottleneck_size(s.bottleneck_size, s.reduction_factor, config.hidden_size)
        modules = nn.ModuleDict(
            {
                "attn_adapter": BottleneckAdapter(config.hidden_size, size, s.non_linearity),
                "ffn_adapter": BottleneckAdapter(config.hidden_size, size, s.non_linearity),
            }
        )
        add_sequential_adapter(block, spec.attn_output, modules["attn_adapter"])
        add_sequential_adapter(block, spec.ffn_output, modules["ffn_adapter"])
        return modules

    def extra_trainable(self, block, spec):
        if not self.settings.train_layer_norms:
            return []
        return [block.get_submodule(path) for path in spec.norms]


@register_method("adapter_pfeiffer")
class PfeifferAdapter(InjectedMethod):
    """Pfeiffer et al. 2020: one adapter after the FFN of every block."""

    settings_cls = BottleneckSettings

    def inject_block(self, block, spec, config):
        s = self.settings
        size = bottleneck_size(s.bottleneck_size, s.reduction_factor, config.hidden_size)
        modules = nn.ModuleDict({"ffn_adapter": BottleneckAdapter(config.hidden_size, size, s.non_linearity)})
        add_sequential_adapter(block, spec.ffn_output, modules["ffn_adapter"])
        return modules


__all__ = [
    "ARCHS",
    "ArchSpec",
    "BottleneckAdapter",
    "BottleneckSettings",
    "HoulsbyAdapter",
    "HoulsbySettings",
    "InjectedMethod",
    "PfeifferAdapter",
    "arch_spec",
    "transformer_blocks",
]
