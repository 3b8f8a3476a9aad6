"""The LoRA family through peft: LoRA, QLoRA, DoRA, rsLoRA, PiSSA, LoRA+, AdaLoRA and (IA)³.

peft does the work; ftune picks the target modules per architecture and keeps the task head
trainable (peft's SEQ_CLS task type puts ``classifier``/``score`` in ``modules_to_save``).
Saved format: peft's own (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
``peft.PeftModel.from_pretrained(base, run_dir / "adapter")`` on the original base model.

- ``lora``: LoRA (Hu et al. 2021), B·A on the target weights, scaled by alpha / r.
- ``qlora``: LoRA on an NF4 4-bit base (Dettmers et al. 2023). Every LoRA-family method takes
  ``method.quantize=true`` for the same 4-bit base (``method=dora method.quantize=true`` is QDoRA).
- ``dora``: DoRA (Liu et al. 2024), the weight split into a trained magnitude vector and a LoRA-updated
  direction.
- ``rslora``: rank-stabilised LoRA (Kalajdzievski 2023), scaled by alpha / sqrt(r).
- ``pissa``: PiSSA (Meng et al. 2024), A and B initialised from the top-r singular vectors of W, which
  is replaced by the residual. Saved converted to a plain rank-2r LoRA of the *original* base.
- ``loraplus``: LoRA+ (Hayou et al. 2024), B trained at ``loraplus_lr_ratio`` × A's learning rate.
- ``adalora``: AdaLoRA (Zhang et al. 2023), SVD-shaped updates whose rank budget is pruned from
  ``init_r`` to ``target_r`` per module on average while training.
- ``ia3``: (IA)³ (Liu et al. 2022), learned vectors scaling keys, values and the FFN activation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ftune.config import AT_LEAST_1, NOT_NEGATIVE, POSITIVE, PROBABILITY, Range, ranged
from ftune.errors import MethodNotApplicable
from ftune.methods.base import Method, MethodContext, MethodSettings, register_method
from ftune.methods.unfreezing import UnfreezeSettings, UnfreezesGradually

PEFT_TASK = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}

# The attention query/value projections: LoRA's default targets (Hu et al. 2021), per architecture.
# GPT-2 fuses q, k and v into one Conv1D (c_attn). Other architectures fall back to peft's table.
ATTENTION_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "olmoe": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}


def default_targets(model_type: str) -> list[str] | None:
    """ftune's attention targets for ``model_type``; None lets peft choose (and explain if it cannot)."""
    targets = ATTENTION_TARGETS.get(model_type)
    return list(targets) if targets else None


def as_targets(value: Any) -> Any:
    """A target_modules setting as peft wants it: a list, a regex / "all-linear" string, or None."""
    if value is None or isinstance(value, str):
        return value
    return list(value)


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
class LoraSettings(UnfreezeSettings):  # schedule=gradual: the blocks' adapters join one block at a time
    r: int = ranged(8, AT_LEAST_1)
    alpha: int = ranged(16, POSITIVE)
    dropout: float = ranged(0.05, PROBABILITY)
    # None: the architecture's attention query/value projections; a list of module names; a regex;
    # or "all-linear" for every linear layer except the output head.
    target_modules: Any | None = None
    bias: str = "none"
    modules_to_save: list | None = None
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: Any = True  # True (Kaiming A, zero B) | "gaussian" | "pissa" | "olora" | ...
    quantize: bool = False  # train on an NF4 4-bit quantized, frozen base (QLoRA-style); qlora implies it
    # MoE models: LoRA on every expert too (one B·A per expert on the fused mlp.experts tensors, through peft's
    # target_parameters; Qwen2-MoE's shared expert through its linear layers), beside target_modules
    target_experts: bool = False


@register_method("lora")
class Lora(UnfreezesGradually, PeftMethod):
    """LoRA (Hu et al. 2021): low-rank updates B·A on the target weights.

    ``method.schedule=gradual`` trains the top block's adapters first and adds the adapters of one more
    block at a time, each at a lower lr (ftune.methods.unfreezing); the saved adapter holds every block's.
    """

    settings_cls = LoraSettings
    mergeable = True
    # settings a variant fixes whatever the YAML says (DoRA is use_dora=True, ...)
    forced: ClassVar[dict[str, Any]] = {}

    @property
    def quantized(self) -> bool:
        """Whether the base model is quantized to 4 bits before the adapter is added."""
        return bool(getattr(self.settings, "quantize", False))

    def fsdp_refusal(self):
        if self.quantized:
            return ("its base weights are 4-bit bitsandbytes tensors, and FSDP2 shards parameters as plain tensors: "
                    "the 4-bit quantization state would be dropped")
        return None

    def lora_kwargs(self, ctx: MethodContext) -> dict:
        s = self.settings
        target = as_targets(s.target_modules)
        if target is None:
            target = default_targets(ctx.model_type)
        kwargs = dict(
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
        kwargs.update(self.forced)
        return kwargs

    def peft_config(self, model, ctx):
        from peft import LoraConfig

        kwargs = self.lora_kwargs(ctx)
        if getattr(self.settings, "target_experts", False):
            from ftune.moe import expert_target_parameters, shared_expert_modules

            kwargs["target_parameters"] = expert_target_parameters(model)
            shared = shared_expert_modules(model)
            if shared:
                target = kwargs["target_modules"]
                if isinstance(target, str):  # a regex or all-linear: the shared expert as an alternative
                    target = target if target == "all-linear" else rf"(?:{target})|.*\.(?:{'|'.join(shared)})"
                else:
                    target = list(target or []) + shared
                kwargs["target_modules"] = target
            elif kwargs["target_modules"] is None:
                kwargs["target_modules"] = []  # the experts only
        try:
            return LoraConfig(**kwargs)
        except ValueError as e:
            raise MethodNotApplicable(f"Invalid {self.name} settings: {e}") from None

    def check(self, model, ctx):
        self.check_blocks(model)
        if getattr(self.settings, "target_experts", False):
            self.check_experts(model)

    def check_experts(self, model) -> None:
        """method.target_experts=true: an MoE model, and the LoRA settings peft's expert LoRA accepts."""
        from ftune.moe import is_moe, not_moe_error

        s, name = self.settings, self.name
        if not is_moe(model):
            raise MethodNotApplicable(str(not_moe_error(model, "method.target_experts=true")))
        if s.dropout:
            raise MethodNotApplicable(
                f"method.target_experts=true puts LoRA on the fused expert tensors (peft's target_parameters), "
                f"which cannot apply dropout: the input cannot be factored out of B·A·dropout(x) when the update "
                f"is added to a weight. Set method.dropout=0 (method.dropout={s.dropout} now)."
            )
        if s.use_dora or self.forced.get("use_dora") or self.quantized or str(s.init_lora_weights).startswith("pissa"):
            raise MethodNotApplicable(
                f"method={name} with method.target_experts=true is not supported: peft's LoRA on expert tensors is "
                f"plain LoRA (no DoRA, PiSSA or 4-bit base). Use method=lora (or rslora) method.target_experts=true "
                f"method.dropout=0."
            )

    def prepare(self, model, ctx):
        if not self.quantized:
            return self.start_unfreezing(super().prepare(model, ctx), ctx)
        from peft import get_peft_model, prepare_model_for_kbit_training

        from ftune.models import quantize_4bit

        model = quantize_4bit(model, ctx.compute_dtype, ctx.device, skip=ctx.head_names, report=ctx.report)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=ctx.activation_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return self.start_unfreezing(get_peft_model(model, self.peft_config(model, ctx)), ctx)

    def load(self, base_model, out_dir, ctx):
        if self.quantized:
            from ftune.models import quantize_4bit

            base_model = quantize_4bit(base_model, ctx.compute_dtype, ctx.device, skip=ctx.head_names,
                                      report=ctx.report)
        return super().load(base_model, out_dir, ctx)

    def merge(self, model):
        if self.quantized:
            raise MethodNotApplicable(
                f"A {self.name} model trained on a 4-bit base must be merged onto full-precision base weights, "
                f"not into the 4-bit ones; `ftune merge` reloads the base in full precision and applies the "
                f"adapter there."
            )
        return super().merge(model)


@register_method("qlora")
class QLora(Lora):
    """QLoRA (Dettmers et al. 2023): LoRA on an NF4 4-bit quantized, frozen base model."""

    @property
    def quantized(self) -> bool:
        return True


@register_method("dora")
class Dora(Lora):
    """DoRA (Liu et al. 2024): W' = m · (W + s·BA) / ||W + s·BA||, magnitude m and LoRA B·A trained.

    ``method.quantize=true`` puts it on an NF4 4-bit base (QDoRA); peft dequantizes the weight to
    compute the column norms.
    """

    forced = {"use_dora": True}


@register_method("rslora")
class RsLora(Lora):
    """rsLoRA (Kalajdzievski 2023): LoRA scaled by alpha / sqrt(r) instead of alpha / r."""

    forced = {"use_rslora": True}


@dataclass
class PissaSettings(LoraSettings):
    init_lora_weights: Any = "pissa"  # "pissa" (exact SVD) or "pissa_niter_<n>" (fast randomized SVD)


@register_method("pissa")
class Pissa(Lora):
    """PiSSA (Meng et al. 2024): A, B = the top-r singular triplets of W (split as sqrt(S)), W -> W - s·B·A.

    Training changes the principal part of W, so the trained A, B only mean something on the residual
    base. ``save`` therefore writes the update as a plain LoRA of the *original* weights, peft's
    conversion ``ΔW = s·(B·A - B₀·A₀) = s·[B | -B₀]·[A ; A₀]``: an adapter of rank 2r (alpha doubled, so
    the scale stays) that ``PeftModel.from_pretrained`` loads onto the unmodified base model.
    """

    settings_cls = PissaSettings

    def check(self, model, ctx):
        super().check(model, ctx)
        init = str(self.settings.init_lora_weights)
        if not init.startswith("pissa"):
            raise MethodNotApplicable(
                f"method=pissa needs method.init_lora_weights=pissa or pissa_niter_<n>, not {init!r}; "
                f"for another initialisation use method=lora method.init_lora_weights={init}."
            )
        if self.quantized:
            raise MethodNotApplicable(
                "PiSSA initialises A and B from an SVD of the full-precision weights and cannot start from a 4-bit "
                "base (peft refuses it); train it with method.quantize=false, or use method=qlora / "
                "method=dora method.quantize=true."
            )

    def prepare(self, model, ctx):
        from peft.utils import get_peft_model_state_dict

        model = super().prepare(model, ctx)
        # The initial adapter (A₀, B₀ and the initial task head), kept with the model to convert the
        # trained adapter when it is saved.
        model._ftune_pissa_initial = {k: v.detach().clone().contiguous().cpu()
                                      for k, v in get_peft_model_state_dict(model).items()}
        return model

    def fsdp_refusal(self):
        return ("its save converts the trained adapter by loading the initial one into the model beside it, and "
                "loading weights into an FSDP2 model goes through FSDP2's own hooks, which expect each process's "
                "slice, not the whole tensors that the save works on")

    def save(self, model, out_dir: Path) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        initial = getattr(model, "_ftune_pissa_initial", None)
        if initial is None:  # a model that load() rebuilt is already a plain LoRA of the original base
            return super().save(model, out_dir)
        was_training = model.training
        with tempfile.TemporaryDirectory() as tmp:
            init_dir = Path(tmp) / "pissa_init"
            init_dir.mkdir()
            save_file(initial, str(init_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            # peft writes init_dir/adapter_config.json (init_lora_weights=True), loads it as a second
            # adapter, subtracts it and deletes it again.
            model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=str(init_dir))
        model.train(was_training)
        # peft 0.21's conversion keeps only the lora_A / lora_B tensors; put back the other trained ones
        # (the task head in modules_to_save, trained biases), which apply unchanged to the original base.
        file = Path(out_dir) / "adapter_model.safetensors"
        converted = load_file(str(file))
        rest = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()
                if k not in converted and "lora_A" not in k and "lora_B" not in k}
        if rest:
            save_file({**converted, **rest}, str(file), metadata={"format": "pt"})


@dataclass
class LoraPlusSettings(LoraSettings):
    loraplus_lr_ratio: float = ranged(16.0, POSITIVE)  # lr of B / lr of A (η_B / η_A); LoRA+ recommends 2^4
    loraplus_lr_embedding: float = ranged(1e-6, NOT_NEGATIVE)  # lr of LoRA on embedding layers (peft's default)


@register_method("loraplus")
class LoraPlus(Lora):
    """LoRA+ (Hayou et al. 2024): plain LoRA, but B learns ``loraplus_lr_ratio`` times faster than A.

    The optimizer comes from ftune's optimizer config, so this builds the same parameter groups as
    ``peft.optimizers.create_loraplus_optimizer``: A (and the task head's weight) at lr, B and every
    1-d parameter (biases, DoRA magnitudes) at lr × ratio, LoRA on embeddings at
    ``loraplus_lr_embedding``; parameters peft exempts from weight decay (biases, layer norms) get none.
    The learning-rate schedule scales every group by the same factor; with ``method.schedule=gradual``
    each of these groups is split by block.
    """

    settings_cls = LoraPlusSettings

    def check(self, model, ctx):
        super().check(model, ctx)
        if self.settings.loraplus_lr_ratio <= 0:
            raise MethodNotApplicable(
                f"method.loraplus_lr_ratio must be > 0 (LoRA+ uses 16), got {self.settings.loraplus_lr_ratio}."
            )

    def base_param_groups(self, model, lr):
        from peft.optimizers import create_loraplus_optimizer

        s = self.settings
        # peft's grouping, read off an optimizer that is never stepped: [A, embedding, B, B without decay]
        probe = create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, loraplus_lr_ratio=s.loraplus_lr_ratio,
                                          loraplus_lr_embedding=s.loraplus_lr_embedding)
        groups = []
        for i, (g, name) in enumerate(zip(probe.param_groups, ("A", "embedding", "B", "B_no_decay"), strict=True)):
            if not g["params"]:
                continue
            group = {"params": list(g["params"]), "lr": g["lr"], "name": f"loraplus_{name}"}
            if i == 3:
                group["weight_decay"] = 0.0
            groups.append(group)
        return groups


@dataclass
class AdaLoraSettings(MethodSettings):
    init_r: int = ranged(12, AT_LEAST_1)  # the rank every target starts with
    target_r: int = ranged(8, AT_LEAST_1)  # the average rank left per target after pruning (total budget = target_r × targets)
    alpha: int = ranged(32, POSITIVE)
    dropout: float = ranged(0.05, PROBABILITY)
    target_modules: Any | None = None  # as for lora: None = the attention query/value projections
    # The schedule, relative to the run's real optimizer steps T: tinit warm-up steps at init_r, a cubic
    # budget decrease, then tfinal steps at the final budget. tinit / tfinal (steps) win over the ratios.
    tinit_ratio: float = ranged(0.1, Range(0, 1, high_open=True))
    tfinal_ratio: float = ranged(0.2, Range(0, 1, high_open=True))
    tinit: int | None = ranged(None, NOT_NEGATIVE, "for tinit_ratio")
    tfinal: int | None = ranged(None, NOT_NEGATIVE, "for tfinal_ratio")
    deltaT: int = ranged(10, AT_LEAST_1)  # steps between two budget re-allocations
    beta1: float = ranged(0.85, PROBABILITY)  # EMA of the sensitivity
    beta2: float = ranged(0.85, PROBABILITY)  # EMA of its uncertainty
    orth_reg_weight: float = ranged(0.5, NOT_NEGATIVE)  # weight of the orthogonality regulariser on P (B) and Q (A)


def adalora_schedule(s: AdaLoraSettings, total: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of ``total`` optimizer steps (the loop numbers them 0 .. total-1)."""
    tfinal = s.tfinal if s.tfinal is not None else max(1, round(s.tfinal_ratio * total))
    tinit = s.tinit if s.tinit is not None else int(s.tinit_ratio * total)
    tinit = min(tinit, max(0, total - tfinal - 1))
    return tinit, tfinal


@register_method("adalora")
class AdaLora(PeftMethod):
    """AdaLoRA (Zhang et al. 2023): ΔW = P·Λ·Q with the singular values Λ pruned by importance.

    peft's ``update_and_allocate`` runs after every optimizer step (``after_step``): it updates the
    sensitivity EMAs from the gradients and masks the least important triplets down to the scheduled
    budget; from step T - tfinal on the budget is fixed at ``target_r`` × targets. The orthogonality
    regulariser, which peft only adds when the model computes the loss from labels, is ``extra_loss``.
    The saved adapter keeps only the surviving ranks (peft's ``rank_pattern``).
    """

    settings_cls = AdaLoraSettings
    mergeable = True

    def fsdp_refusal(self):
        return ("its rank allocator reads and masks whole lora_A, lora_E and lora_B tensors and their gradients "
                "after every step, and its orthogonality loss reads them outside the forward, while FSDP2 holds "
                "only each process's slice of them")

    def check(self, model, ctx):
        s = self.settings
        if not 0 < s.target_r < s.init_r:
            raise MethodNotApplicable(
                f"AdaLoRA prunes from init_r down to target_r, so it needs 0 < target_r < init_r; got "
                f"init_r={s.init_r}, target_r={s.target_r}."
            )
        if ctx.total_steps < 2:
            raise MethodNotApplicable(
                f"AdaLoRA schedules its rank budget over the run and needs at least 2 optimizer steps; this run "
                f"has {ctx.total_steps}. Raise trainer.max_steps or trainer.epochs."
            )
        tinit, tfinal = adalora_schedule(s, ctx.total_steps)
        if tfinal < 1 or tinit + tfinal >= ctx.total_steps:
            raise MethodNotApplicable(
                f"AdaLoRA's schedule does not fit the run's {ctx.total_steps} steps: tinit={tinit} + tfinal={tfinal} "
                f"must be below it, with tfinal >= 1 (the step that fixes the final budget). Lower "
                f"method.tinit / method.tfinal or use the ratio settings."
            )

    def peft_config(self, model, ctx):
        from peft import AdaLoraConfig

        s = self.settings
        tinit, tfinal = adalora_schedule(s, ctx.total_steps)
        target = as_targets(s.target_modules)
        try:
            return AdaLoraConfig(
                task_type=PEFT_TASK[ctx.task], init_r=s.init_r, target_r=s.target_r, lora_alpha=s.alpha,
                lora_dropout=s.dropout, target_modules=target if target is not None else default_targets(ctx.model_type),
                tinit=tinit, tfinal=tfinal, deltaT=s.deltaT, beta1=s.beta1, beta2=s.beta2,
                orth_reg_weight=s.orth_reg_weight, total_step=ctx.total_steps,
            )
        except ValueError as e:
            raise MethodNotApplicable(f"Invalid adalora settings: {e}") from None

    def prepare(self, model, ctx):
        model = super().prepare(model, ctx)
        self._model = model
        return model

    def _tuner(self, model=None):
        model = model if model is not None else getattr(self, "_model", None)
        return None if model is None else model.base_model

    def extra_loss(self, model, batch, outputs, step):
        """peft's AdaLoraModel.forward term: w · mean over A and B of ||P^T P - I||_F, ||Q Q^T - I||_F."""
        tuner = self._tuner(model)
        weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
        if weight == 0:
            return None
        adapter = tuner.trainable_adapter_name
        terms = []
        for n, p in tuner.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and adapter in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        if not terms:
            return None
        return weight * torch.stack(terms).mean()

    def after_step(self, model, step):
        # peft reads the gradients (still there: the loop zeroes them after this hook) and masks lora_E
        self._tuner(model).update_and_allocate(step)

    def state_dict(self):
        tuner = self._tuner()
        if tuner is None or not hasattr(tuner, "rankallocator"):
            return {}
        alloc = tuner.rankallocator
        config = tuner.peft_config[tuner.trainable_adapter_name]
        return {
            "ipt": dict(alloc.ipt),
            "exp_avg_ipt": dict(alloc.exp_avg_ipt),
            "exp_avg_unc": dict(alloc.exp_avg_unc),
            "rank_pattern": config.rank_pattern,
        }

    def load_state_dict(self, state):
        tuner = self._tuner()
        if not state or tuner is None:
            return
        alloc = tuner.rankallocator
        device = next(tuner.model.parameters()).device
        alloc.ipt = {k: v.to(device) for k, v in state["ipt"].items()}
        alloc.exp_avg_ipt = {k: v.to(device) for k, v in state["exp_avg_ipt"].items()}
        alloc.exp_avg_unc = {k: v.to(device) for k, v in state["exp_avg_unc"].items()}
        tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]

    def save(self, model, out_dir):
        # peft's save renames the rank_pattern keys in place; keep the training copy intact
        config = model.peft_config[model.active_adapter]
        pattern = dict(config.rank_pattern) if config.rank_pattern else config.rank_pattern
        try:
            super().save(model, out_dir)
        finally:
            config.rank_pattern = pattern

    def load(self, base_model, out_dir, ctx):
        import warnings

        with warnings.catch_warnings():
            # peft 0.21 also reads AdaLoRA's rank_pattern (lora_E names -> kept ranks) as LoRA's per-module
            # rank table and warns that its keys match no module; the resize by that pattern still happens.
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load(base_model, out_dir, ctx)

    def rank_budget(self, model=None) -> dict[str, int]:
        """The current rank of every target: its unmasked singular values (nonzero lora_E entries)."""
        tuner = self._tuner(model)
        adapter = tuner.trainable_adapter_name if hasattr(tuner, "trainable_adapter_name") else "default"
        return {n.removesuffix(f".lora_E.{adapter}"): int((p != 0).sum())
                for n, p in tuner.model.named_parameters() if n.endswith(f"lora_E.{adapter}")}


# (IA)³ targets per architecture: (target_modules, feedforward_modules). The vectors scale the keys and
# values (the attention projections' outputs) and the FFN activation (the input of the FFN's output
# projection). peft's own table targets q_proj instead of k_proj for qwen2/qwen3, and for BERT its
# "output.dense" also matches attention.output.dense (a second, non-FFN layer scaled at its input),
# so ftune uses regexes there. GPT-2's c_attn fuses q, k and v: its vector scales all three.
IA3_TARGETS: dict[str, tuple[Any, Any]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (r".*\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)", r".*\.layer\.\d+\.output\.dense"),
}


@dataclass
class IA3Settings(MethodSettings):
    # None: keys, values and the FFN output projection of the architecture (see IA3_TARGETS);
    # or a list of module names / a regex, with feedforward_modules the subset scaled at the input.
    target_modules: Any | None = None
    feedforward_modules: Any | None = None
    modules_to_save: list | None = None


@register_method("ia3")
class IA3(PeftMethod):
    """(IA)³ (Liu et al. 2022): k ⊙ l_k, v ⊙ l_v and the FFN activation ⊙ l_ff, the l vectors trained from 1."""

    settings_cls = IA3Settings
    mergeable = True

    def peft_config(self, model, ctx):
        from peft import IA3Config

        s = self.settings
        target, feedforward = as_targets(s.target_modules), as_targets(s.feedforward_modules)
        if target is None:
            if ctx.model_type not in IA3_TARGETS:
                raise MethodNotApplicable(
                    f"ftune has no (IA)³ targets for a {ctx.model_type} model; name the key, value and FFN-output "
                    f"modules with method.target_modules=[...] and the FFN ones with method.feedforward_modules=[...]."
                )
            target, default_ff = IA3_TARGETS[ctx.model_type]
            feedforward = default_ff if feedforward is None else feedforward
        elif feedforward is None:
            feedforward = []
        try:
            return IA3Config(task_type=PEFT_TASK[ctx.task], target_modules=target, feedforward_modules=feedforward,
                             modules_to_save=list(s.modules_to_save) if s.modules_to_save else None)
        except ValueError as e:
            raise MethodNotApplicable(f"Invalid ia3 settings: {e}") from None
