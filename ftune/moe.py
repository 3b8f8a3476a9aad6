"""Mixture-of-Experts models: their routers and experts, the router losses, routing diagnostics, upcycling.

transformers 5 builds every sparse block the same way: ``mlp.gate`` is the top-k router (a module that
holds ``weight [E, H]``, not an ``nn.Linear``; its forward returns ``(router_logits, top_k_weights,
top_k_index)``) and ``mlp.experts`` holds the fused expert weights ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``. Qwen2-MoE adds an always-on ``shared_expert`` (a dense MLP) scaled per token by
``sigmoid(shared_expert_gate(x))``. ftune's split of the parameters:

- **router**: ``mlp.gate.weight`` and Qwen2-MoE's ``mlp.shared_expert_gate.weight`` (both decide, per
  token, how much each FFN contributes; neither is an FFN);
- **experts**: ``mlp.experts.*`` and Qwen2-MoE's ``mlp.shared_expert.*`` (the FFN weights).

Router losses (:class:`Routing`), only while a router parameter trains: the load-balancing loss of
Switch Transformer as transformers computes it (``output_router_logits=True``; ``outputs.aux_loss``,
weighted by ``router_aux_loss_coef``) and the router z-loss of ST-MoE, ``mean_tokens(logsumexp(logits)²)``
averaged over layers, for the models pretrained with it (OLMoE, coefficient 1e-3; transformers 5 does not
compute it, so ftune does from the router logits).

Diagnostics (:func:`routing_snapshot`, :func:`compare_routing`): on the eval data, each layer's share of
the top-k assignments per expert (sums to 1), the mean entropy of the router's softmax (≤ log E), and the
share of tokens whose top-k expert set differs from the base model's.

Sparse upcycling (:func:`upcycle`, Komatsuzaki et al. 2023): a dense Llama/Mistral becomes a Mixtral with
E copies of its MLP as experts and a small random router. Mixtral renormalises the top-k weights to sum to
1, so with identical experts the block's output is the dense MLP's whatever the router picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftune.errors import FtuneError

# Router z-loss coefficients of the models pretrained with one (OLMoE: Muennighoff et al. 2024, 0.001).
Z_LOSS_COEF = {"olmoe": 1e-3}
UPCYCLE_MODEL_TYPES = ("llama", "mistral")  # dense models whose layers are a Mixtral's but for the MLP
MAX_DIAGNOSTIC_EXAMPLES = 512  # examples the routing diagnostics run over (the eval split's first ones)


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every sparse MoE block, in layer order: modules with a top-k router
    ``gate`` (holding ``weight``, ``top_k``, ``num_experts``) and ``experts``."""
    blocks = []
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if (isinstance(gate, nn.Module) and isinstance(experts, nn.Module) and hasattr(gate, "top_k")
                and hasattr(gate, "num_experts") and isinstance(getattr(gate, "weight", None), torch.Tensor)):
            blocks.append((name, module))
    return blocks


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def _block_parameters(model: nn.Module, children: tuple[str, ...]) -> list[str]:
    """Qualified names of the parameters of each MoE block's ``children`` modules."""
    names = []
    for block_name, block in moe_blocks(model):
        for child in children:
            module = getattr(block, child, None)
            if isinstance(module, nn.Module):
                names += [f"{block_name}.{child}.{n}" for n, _ in module.named_parameters()]
    return names


def router_parameter_names(model: nn.Module) -> list[str]:
    """The routers' parameters: each block's ``gate`` (and Qwen2-MoE's ``shared_expert_gate``)."""
    return _block_parameters(model, ("gate", "shared_expert_gate"))


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The experts' parameters: each block's ``experts`` (and Qwen2-MoE's ``shared_expert``)."""
    return _block_parameters(model, ("experts", "shared_expert"))


def expert_target_parameters(model: nn.Module) -> list[str]:
    """peft ``target_parameters`` for the fused expert tensors, e.g. ``["mlp.experts.gate_up_proj", ...]``."""
    names = set()
    for block_name, block in moe_blocks(model):
        local = block_name.rsplit(".", 1)[-1]  # "mlp" of "model.layers.0.mlp"
        for pname, p in block.experts.named_parameters():
            if p.dim() == 3 and "lora_" not in pname:
                names.add(f"{local}.experts.{pname.split('.')[-1]}")
    return sorted(names)


def shared_expert_modules(model: nn.Module) -> list[str]:
    """peft ``target_modules`` suffixes of the shared expert's linear layers (Qwen2-MoE); [] for none."""
    names = set()
    for block_name, block in moe_blocks(model):
        shared = getattr(block, "shared_expert", None)
        if isinstance(shared, nn.Module):
            local = block_name.rsplit(".", 1)[-1]
            names.update(f"{local}.shared_expert.{n}" for n, m in shared.named_modules() if isinstance(m, nn.Linear))
    return sorted(names)


def routers(model: nn.Module) -> list[nn.Module]:
    return [block.gate for _, block in moe_blocks(model)]


def router_trains(model: nn.Module) -> bool:
    params = dict(model.named_parameters())
    return any(params[n].requires_grad for n in router_parameter_names(model))


def not_moe_error(model: nn.Module, what: str) -> FtuneError:
    model_type = getattr(getattr(model, "config", None), "model_type", "this")
    return FtuneError(
        f"{what} needs a Mixture-of-Experts model (sparse blocks with a router `mlp.gate` and experts "
        f"`mlp.experts`), and this {model_type} model has none. Use an MoE model (model=tiny_mixtral, "
        f"tiny_qwen2_moe, tiny_qwen3_moe, tiny_olmoe, or a Mixtral/Qwen-MoE/OLMoE checkpoint), or turn a dense "
        f"Llama into one with model.upcycle_experts=4 model.upcycle_top_k=2."
    )


# --- router losses during training ---------------------------------------------------------------------
class RouterCapture:
    """Forward hooks on every router, keeping the last forward's logits and top-k indices per layer."""

    def __init__(self, model: nn.Module):
        self.logits: dict[int, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(routers(model))]

    def _hook(self, layer: int):
        def hook(module, args, output):
            # overwritten by every forward (activation checkpointing's recomputation included)
            self.logits[layer], self.indices[layer] = output[0], output[2]
        return hook

    def layers(self) -> list[int]:
        return sorted(self.logits)

    def clear(self) -> None:
        self.logits.clear()
        self.indices.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class Routing:
    """The router losses of a run on an MoE model, on exactly when a router parameter trains.

    ``aux_coef`` weights the load-balancing loss (``outputs.aux_loss`` when the model returns it, else the
    same function over the captured router logits: a classification head drops it), ``z_coef`` the z-loss.
    """

    trains_router: bool
    aux_coef: float
    z_coef: float
    num_experts: int
    top_k: int
    capture: RouterCapture | None = None
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    before: RoutingSnapshot | None = None  # the base model's routing on the diagnostic examples

    @classmethod
    def of(cls, model: nn.Module, method_settings: Any = None) -> Routing | None:
        """The run's Routing after the method prepared ``model``; None for a dense model."""
        gates = routers(model)
        if not gates:
            return None
        config = model.config
        trains = router_trains(model)
        aux = getattr(method_settings, "router_aux_loss_coef", None)
        aux = float(getattr(config, "router_aux_loss_coef", 0.0) if aux is None else aux)
        z = getattr(method_settings, "router_z_loss_coef", None)
        z = float(Z_LOSS_COEF.get(config.model_type, 0.0) if z is None else z)
        config.output_router_logits = trains  # transformers then returns outputs.aux_loss
        routing = cls(trains, aux if trains else 0.0, z if trains else 0.0,
                      int(gates[0].num_experts), int(gates[0].top_k))
        if trains:
            routing.capture = RouterCapture(model)
        return routing

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """coef · load-balancing loss + coef · z-loss of this micro-batch's forward; None when no router trains."""
        if not self.trains_router or self.capture is None:
            return None
        cap = self.capture
        logits = tuple(cap.logits[i] for i in cap.layers())
        mask = batch.get("attention_mask")
        aux = getattr(outputs, "aux_loss", None)
        if not isinstance(aux, torch.Tensor):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux = load_balancing_loss_func(logits, self.num_experts, self.top_k, mask)
        cap.clear()
        self.sums["moe/aux_loss"] = self.sums.get("moe/aux_loss", 0.0) + float(aux.detach())
        total = self.aux_coef * aux.float()
        if self.z_coef:
            z = router_z_loss(logits, mask)
            self.sums["moe/z_loss"] = self.sums.get("moe/z_loss", 0.0) + float(z.detach())
            total = total + self.z_coef * z
        self.count += 1
        return total

    def row_metrics(self) -> dict[str, float]:
        """Mean unweighted aux loss (and z-loss, where it applies) per micro-batch since the last logged row."""
        if not self.count:
            return {}
        row = {k: v / self.count for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return row

    def settings_report(self) -> dict[str, Any]:
        return {"moe/experts": self.num_experts, "moe/top_k": self.top_k, "moe/router_trains": self.trains_router,
                "moe/aux_loss_coef": self.aux_coef, "moe/z_loss_coef": self.z_coef}


def router_z_loss(logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over (unpadded) tokens of logsumexp(logits)², averaged over layers."""
    values = []
    for layer in logits:
        z = torch.logsumexp(layer.float(), dim=-1) ** 2
        if mask is not None and mask.numel() == z.numel():
            m = mask.reshape(-1).to(z.dtype)
            values.append((z * m).sum() / m.sum().clamp(min=1))
        else:
            values.append(z.mean())
    return torch.stack(values).mean()


# --- diagnostics -----------------------------------------------------------------------------------
@dataclass
class RoutingSnapshot:
    """How a model routes the diagnostic tokens: per layer, top-k expert indices [tokens, k] (sorted),
    the load per expert and the mean router entropy."""

    topk: list[torch.Tensor]
    load: list[list[float]]
    entropy: list[float]
    tokens: int


@torch.no_grad()
def routing_snapshot(model: nn.Module, examples: list[dict], collator: Any, device: torch.device,
                     batch_size: int, autocast_dtype: torch.dtype | None, task: str) -> RoutingSnapshot:
    """Run ``model`` over ``examples`` and record its routing of every unpadded token."""
    was_training = model.training
    model.eval()
    capture = RouterCapture(model)
    n_layers = len(capture.handles)
    topk: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    entropy_sum = [0.0] * n_layers
    experts = int(routers(model)[0].num_experts)
    counts = torch.zeros(n_layers, experts, dtype=torch.float64)
    tokens = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start:start + batch_size])
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "example_ids")}
            if task == "causal_lm":
                inputs["logits_to_keep"] = 1  # the routing is all we need: no vocabulary projection
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model(**inputs)
            mask = inputs.get("attention_mask")
            keep = mask.reshape(-1).bool() if mask is not None else None
            for layer in range(n_layers):
                logits, idx = capture.logits[layer].float(), capture.indices[layer]
                if keep is not None:
                    logits, idx = logits[keep], idx[keep]
                p = torch.softmax(logits, dim=-1)
                entropy_sum[layer] += float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).sum())
                counts[layer] += torch.bincount(idx.reshape(-1).cpu(), minlength=experts).double()
                topk[layer].append(idx.sort(dim=-1).values.cpu().to(torch.int16))
            tokens += int(keep.sum()) if keep is not None else int(inputs["input_ids"].numel())
            capture.clear()
    finally:
        capture.remove()
        model.train(was_training)
    load = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
    return RoutingSnapshot([torch.cat(t) if t else torch.empty(0, dtype=torch.int16) for t in topk], load,
                           [e / max(tokens, 1) for e in entropy_sum], tokens)


def compare_routing(before: RoutingSnapshot, after: RoutingSnapshot) -> dict[str, Any]:
    """``moe/`` metrics: load per expert and router entropy before and after, and the share of tokens
    whose top-k expert set changed (per layer and over all layers)."""
    changed = [float((b != a).any(dim=-1).float().mean()) if b.numel() else 0.0
               for b, a in zip(before.topk, after.topk, strict=True)]
    experts = len(before.load[0]) if before.load else 0
    return {
        "moe/diagnostic_tokens": after.tokens,
        "moe/max_entropy": math.log(experts) if experts else 0.0,
        "moe/entropy_before": sum(before.entropy) / max(len(before.entropy), 1),
        "moe/entropy_after": sum(after.entropy) / max(len(after.entropy), 1),
        "moe/load_cv_before": mean_cv(before.load),
        "moe/load_cv_after": mean_cv(after.load),
        "moe/changed_topk_share": sum(changed) / max(len(changed), 1),
        "moe/changed_topk_share_per_layer": [round(c, 6) for c in changed],
        "moe/entropy_per_layer_before": [round(e, 6) for e in before.entropy],
        "moe/entropy_per_layer_after": [round(e, 6) for e in after.entropy],
        "moe/load_before": [[round(x, 6) for x in row] for row in before.load],
        "moe/load_after": [[round(x, 6) for x in row] for row in after.load],
    }


def mean_cv(load: list[list[float]]) -> float:
    """The coefficient of variation of the load over experts (0 = perfectly balanced), averaged over layers."""
    if not load:
        return 0.0
    t = torch.tensor(load, dtype=torch.float64)
    return float((t.std(dim=1, unbiased=False) / t.mean(dim=1).clamp(min=1e-12)).mean())


def plot_routing(metrics: dict[str, Any], out: Path, title: str) -> None:
    """moe.png: the load per expert (layers x experts) before and after training, and the changed share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = metrics["moe/load_before"], metrics["moe/load_after"]
    changed = metrics["moe/changed_topk_share_per_layer"]
    layers, experts = len(before), len(before[0])
    vmax = max(max(max(r) for r in before), max(max(r) for r in after))
    fig, axes = plt.subplots(1, 3, figsize=(11, 1.6 + 0.22 * layers + 1.5),
                             gridspec_kw={"width_ratios": [experts, experts, max(3, experts // 2)]})
    for ax, load, name in ((axes[0], before, "before"), (axes[1], after, "after")):
        im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"load per expert, {name}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(experts))
    fig.colorbar(im, ax=axes[1], fraction=0.05, label="share of top-k assignments")
    axes[2].barh(range(layers), changed, color="tab:red")
    axes[2].set_ylim(layers - 0.5, -0.5)
    axes[2].set_xlim(0, max(0.05, 1.1 * max(changed, default=0)))
    axes[2].set_title("tokens whose top-k changed", fontsize=9)
    axes[2].set_xlabel("share")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def card_section(metrics: dict[str, Any]) -> str:
    """The run card's routing section (empty for a dense model)."""
    if "moe/load_before" not in metrics:
        return ""
    lines = ["## Routing (MoE)", "",
             f"{metrics['moe/experts']} experts, top-{metrics['moe/top_k']}; router trained: "
             f"{metrics['moe/router_trains']} (aux loss coef {metrics['moe/aux_loss_coef']}, z-loss coef "
             f"{metrics['moe/z_loss_coef']}); measured on {metrics['moe/diagnostic_tokens']} eval tokens.", "",
             "| layer | load per expert before | load per expert after | entropy before | entropy after | top-k changed |",
             "|---|---|---|---|---|---|"]
    for i, (b, a) in enumerate(zip(metrics["moe/load_before"], metrics["moe/load_after"], strict=True)):
        lines.append(f"| {i} | {' '.join(f'{x:.3f}' for x in b)} | {' '.join(f'{x:.3f}' for x in a)} | "
                     f"{metrics['moe/entropy_per_layer_before'][i]:.3f} | {metrics['moe/entropy_per_layer_after'][i]:.3f} | "
                     f"{metrics['moe/changed_topk_share_per_layer'][i]:.3f} |")
    lines += ["", f"Router entropy is in nats (at most log E = {metrics['moe/max_entropy']:.3f}); `moe.png` plots the "
              "loads.", ""]
    return "\n".join(lines)


# --- sparse upcycling ------------------------------------------------------------------------------
def check_upcycle(experts: int | None, top_k: int) -> None:
    if experts is None:
        return
    if experts < 2:
        raise FtuneError(f"model.upcycle_experts={experts}: an upcycled MoE needs at least 2 experts "
                         f"(for example model.upcycle_experts=4 model.upcycle_top_k=2), or leave it unset (null).")
    if not 1 <= top_k <= experts:
        raise FtuneError(f"model.upcycle_top_k={top_k} must be between 1 and model.upcycle_experts={experts}; "
                         f"Mixtral routes each token to 2 of 8 experts (model.upcycle_top_k=2).")


def upcycle(dense: nn.Module, experts: int, top_k: int, seed: int = 0) -> nn.Module:
    """A Mixtral-style MoE made from a dense Llama/Mistral: each layer's MLP copied into ``experts``
    experts, a router initialised N(0, initializer_range) from ``seed``; every other weight as it was.

    The top-k weights are renormalised to sum to 1 (Mixtral's router), so before training the MoE
    computes what the dense model computes (up to float rounding) whatever the router chooses."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = dense.config
    if cfg.model_type not in UPCYCLE_MODEL_TYPES:
        raise FtuneError(
            f"model.upcycle_experts turns a dense Llama-family model into a Mixtral, and this model is a "
            f"{cfg.model_type}: upcycling works from {', '.join(UPCYCLE_MODEL_TYPES)} models (model=tiny_llama, "
            f"smollm2, llama, mistral). Drop model.upcycle_experts for this model."
        )
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise FtuneError("model.upcycle_experts: this model's attention or MLP layers have biases, and a Mixtral's "
                         "have none, so its weights cannot be carried over exactly; drop model.upcycle_experts.")
    check_upcycle(experts, top_k)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id",
            "bos_token_id", "eos_token_id", "sliding_window", "num_labels", "id2label", "label2id")
    values = {k: getattr(cfg, k) for k in keep if getattr(cfg, k, None) is not None}
    moe_cfg = AutoConfig.for_model("mixtral", **values, num_local_experts=experts, num_experts_per_tok=top_k)
    head = AutoModelForSequenceClassification if type(dense).__name__.endswith("ForSequenceClassification") \
        else AutoModelForCausalLM
    dtype = next(dense.parameters()).dtype
    with torch.random.fork_rng():  # the same seed always gives the same router
        torch.manual_seed(seed)
        moe = head.from_config(moe_cfg, dtype=dtype)
        dense_sd = dense.state_dict()
        state = {name: tensor for name, tensor in dense_sd.items() if ".mlp." not in name}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}.mlp"
            gate_up = torch.cat([dense_sd[f"{p}.gate_proj.weight"], dense_sd[f"{p}.up_proj.weight"]], dim=0)
            state[f"{p}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
            state[f"{p}.experts.down_proj"] = dense_sd[f"{p}.down_proj.weight"].unsqueeze(0).repeat(experts, 1, 1)
            state[f"{p}.gate.weight"] = torch.randn(experts, cfg.hidden_size, dtype=torch.float32).mul_(
                cfg.initializer_range).to(dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and moe_cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise FtuneError(f"Upcycling this {cfg.model_type} model left weights unmatched (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); it is not laid out like a Llama. Drop model.upcycle_experts.")
    if moe_cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe
