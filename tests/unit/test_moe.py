"""MoE fine-tuning: what each mode trains, the router losses, the routing diagnostics, sparse upcycling.

Expected parameter counts come from the model YAMLs' shapes, independently of ftune's and peft's code.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from ftune.config import validate_group
from ftune.errors import FtuneError
from ftune.methods.base import MethodContext, build_method, trainable_parameters
from ftune.models import build_model
from ftune.moe import RoutingSnapshot, compare_routing, moe_blocks, routing_snapshot, upcycle
from ftune.train import setup, train

from conftest import compose_train, fixed_batch, logits_of

MOE_MODELS = ["tiny_mixtral", "tiny_qwen2_moe", "tiny_qwen3_moe", "tiny_olmoe"]


@functools.cache
def model_cfg(name: str, *overrides: str):
    return validate_group(compose_train([f"model={name}", *overrides]), "model")


def moe_shapes(name: str) -> dict:
    c = dict(model_cfg(name).config)
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return {"H": c["hidden_size"], "L": c["num_hidden_layers"],
            "E": c.get("num_local_experts", c.get("num_experts")),
            "I": c.get("moe_intermediate_size", c["intermediate_size"]),
            "shared": c.get("shared_expert_intermediate_size", 0), "q": heads * head_dim, "kv": kv * head_dim}


def expected_moe(name: str, train: str) -> int:
    s = moe_shapes(name)
    router = s["L"] * s["E"] * s["H"] + (s["L"] * s["H"] if s["shared"] else 0)  # + Qwen2-MoE's shared_expert_gate
    experts = s["L"] * 3 * s["E"] * s["I"] * s["H"] + s["L"] * 3 * s["H"] * s["shared"]  # gate, up, down
    return {"router": router, "experts": experts, "router_experts": router + experts}[train]


def prepared(model_name: str, method: dict, task: str = "causal_lm"):
    """``model_name`` built and prepared by the method ``method`` (its settings over its YAML's)."""
    model = build_model(model_cfg(model_name), task, pad_token_id=0)
    method = build_method(method)
    ctx = MethodContext(task=task, model_type=model.config.model_type)
    method.check(model, ctx)
    return method.prepare(model, ctx), method


@pytest.mark.parametrize("train_mode", ["router", "experts", "router_experts"])
@pytest.mark.parametrize("name", MOE_MODELS)
def test_each_moe_mode_trains_exactly_the_parameters_it_names(name, train_mode):
    model, _ = prepared(name, {"name": "moe", "train": train_mode})
    assert trainable_parameters(model)[0] == expected_moe(name, train_mode)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".mlp." in n for n in trained)  # attention, norms and embeddings stay frozen
    if train_mode == "router":
        assert all(n.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight")) for n in trained)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_lora_on_the_experts_has_one_lora_per_expert(name):
    s, r = moe_shapes(name), 4
    attention = s["L"] * r * ((s["H"] + s["q"]) + (s["H"] + s["kv"]))  # q_proj and v_proj
    experts = s["L"] * r * s["E"] * ((s["H"] + 2 * s["I"]) + (s["I"] + s["H"]))  # gate_up_proj and down_proj
    shared = s["L"] * 3 * r * (s["H"] + s["shared"]) if s["shared"] else 0  # Qwen2-MoE's shared expert: gate, up, down linears
    lora = {"name": "lora", "target_experts": True, "dropout": 0.0, "r": r}
    model, _ = prepared(name, lora)
    assert trainable_parameters(model)[0] == attention + experts + shared
    only, _ = prepared(name, {**lora, "target_modules": []})
    assert trainable_parameters(only)[0] == experts + shared
    # B starts at zero: the adapted model computes what the base computes
    base = build_model(model_cfg(name), "causal_lm", pad_token_id=0)
    ids = torch.randint(4, 1000, (2, 12))
    only.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(only(input_ids=ids).logits, base(input_ids=ids).logits)


def test_lora_on_experts_refuses_dropout_and_dense_models():
    with pytest.raises(FtuneError, match=r"method.dropout=0 \(method.dropout=0.05 now\)"):
        prepared("tiny_mixtral", {"name": "lora", "target_experts": True})
    with pytest.raises(FtuneError, match="Mixture-of-Experts"):
        prepared("tiny_llama", {"name": "lora", "target_experts": True, "dropout": 0.0})
    with pytest.raises(FtuneError, match="Mixture-of-Experts"):
        prepared("tiny_llama", {"name": "moe"})
    with pytest.raises(FtuneError, match="router_experts"):
        prepared("tiny_mixtral", {"name": "moe", "train": "gates"})


def first_row(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


TINY_RUN = ["dataset=demo_instructions", "trainer.max_steps=1", "dataset.max_samples=40", "dataset.max_eval_samples=8"]


@pytest.mark.parametrize("train_mode,router", [("router", True), ("experts", False)])
def test_aux_loss_is_in_the_loss_exactly_when_the_router_trains(tmp_path, train_mode, router):
    runs = {}
    for coef in (0.0, 0.5):
        out = tmp_path / f"{train_mode}_{coef}"
        cfg = compose_train(["model=tiny_mixtral", "method=moe", f"method.train={train_mode}",
                             f"method.router_aux_loss_coef={coef}", *TINY_RUN], out)
        metrics = train(cfg)
        runs[coef] = first_row(out)
    assert metrics["moe/router_trains"] is router
    if not router:  # no aux loss computed, logged or added
        assert "moe/aux_loss" not in runs[0.5] and runs[0.5]["loss"] == runs[0.0]["loss"]
        return
    aux = runs[0.5]["moe/aux_loss"]
    assert aux == pytest.approx(runs[0.0]["moe/aux_loss"], rel=1e-6)
    assert 1.0 <= aux <= 4.0  # Switch's loss is E·Σ f·P: top_k (2) when balanced, at most E·top_k
    # the first step's loss (before any update, same batch) is the task loss + coef · aux
    assert runs[0.5]["loss"] - runs[0.0]["loss"] == pytest.approx(0.5 * aux, rel=1e-4)


def test_router_loss_matches_transformers_and_the_z_loss_applies_to_olmoe(tmp_path):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    run = setup(compose_train(["model=tiny_olmoe", "method=moe", "method.train=router", *TINY_RUN], tmp_path / "r"))
    assert run.model.config.output_router_logits and run.moe.z_coef == 1e-3 and run.moe.aux_coef == 0.01
    batch = fixed_batch(run)
    outputs, _, _ = run.target_logits.forward(run.model, batch, run.data.task)
    logits = tuple(run.moe.capture.logits[i] for i in run.moe.capture.layers())
    aux = load_balancing_loss_func(logits, 4, 2, batch["attention_mask"])
    mask = batch["attention_mask"].reshape(-1).bool()
    z = torch.stack([torch.logsumexp(lg[mask], -1).pow(2).mean() for lg in logits]).mean()
    torch.testing.assert_close(outputs.aux_loss, aux)
    torch.testing.assert_close(run.moe.loss(outputs, batch), 0.01 * aux + 1e-3 * z)
    assert set(run.moe.row_metrics()) == {"moe/aux_loss", "moe/z_loss"}
    dense = setup(compose_train(["model=tiny_mixtral", "method=moe", "method.train=experts", *TINY_RUN],
                                tmp_path / "e"))
    assert not dense.model.config.output_router_logits and dense.moe.loss(None, batch) is None


def test_classification_moe_trains_head_and_router_with_the_aux_loss(tmp_path):
    """A classification head drops outputs.aux_loss: ftune computes it from the captured router logits."""
    out = tmp_path / "cls"
    metrics = train(compose_train(["model=tiny_mixtral", "dataset=sentiment", "method=moe", "method.train=router",
                                   "trainer.max_steps=2"], out))
    s = moe_shapes("tiny_mixtral")
    assert metrics["trainable_params"] == expected_moe("tiny_mixtral", "router") + s["H"] * 2  # + score head
    assert 1.0 <= first_row(out)["moe/aux_loss"] <= 4.0
    assert "eval/accuracy" in metrics and len(metrics["moe/load_after"]) == s["L"]


def test_routing_diagnostics_are_sane(tmp_path):
    run = setup(compose_train(["model=tiny_qwen3_moe", "method=moe", *TINY_RUN], tmp_path / "r"))
    snap = run.moe.before
    assert snap.tokens == sum(len(e["input_ids"]) for e in run.data.eval)
    again = routing_snapshot(run.model, run.data.eval, run.eval_collator, run.device, 3, None, "causal_lm")
    m = compare_routing(snap, again)  # the same model (other batches, other padding): nothing changed
    assert m["moe/changed_topk_share"] == 0.0 and m["moe/changed_topk_share_per_layer"] == [0.0, 0.0]
    for load in m["moe/load_before"]:
        assert sum(load) == pytest.approx(1.0, abs=1e-5) and len(load) == 4
    assert m["moe/max_entropy"] == pytest.approx(math.log(4))
    assert all(0 < e <= math.log(4) + 1e-9 for e in m["moe/entropy_per_layer_before"])
    torch.testing.assert_close(torch.tensor(m["moe/load_before"]), torch.tensor(m["moe/load_after"]))
    # a router set to zero spreads its softmax evenly: entropy log E exactly
    for _, block in moe_blocks(run.model):
        block.gate.weight.data.zero_()
    flat = routing_snapshot(run.model, run.data.eval[:4], run.eval_collator, run.device, 4, None, "causal_lm")
    assert flat.entropy == pytest.approx([math.log(4)] * 2)


def test_changed_share_counts_tokens_whose_topk_set_differs():
    def snap(*rows):
        return RoutingSnapshot([torch.tensor(rows).sort(-1).values], [[0.25] * 4], [1.0], len(rows))

    before = snap([0, 1], [2, 3], [1, 3], [0, 2])
    after = snap([1, 0], [2, 1], [1, 3], [3, 2])  # the same set in another order is no change
    assert compare_routing(before, after)["moe/changed_topk_share"] == 0.5


@pytest.mark.parametrize("experts,top_k", [(4, 2), (3, 1), (2, 2)])
def test_upcycled_model_computes_what_the_dense_model_computes(experts, top_k):
    dense = build_model(model_cfg("tiny_llama"), "causal_lm")
    moe = upcycle(dense, experts, top_k, seed=0)
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == experts
    ids = torch.randint(4, 1000, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    dense.eval(), moe.eval()
    with torch.no_grad():
        want, got = dense(input_ids=ids, attention_mask=mask).logits, moe(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if top_k == experts:
        return
    # and the router does route: the tokens do not all go to the same experts
    layer = moe.model.layers[0].mlp
    with torch.no_grad():
        _, _, idx = layer.gate(torch.randn(50, moe.config.hidden_size))
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1


def test_upcycling_from_the_config_is_reproducible_and_refuses_what_it_cannot(tmp_path):
    over = ["tiny_llama", "model.upcycle_experts=4", "model.upcycle_top_k=2"]
    a = build_model(model_cfg(*over), "causal_lm")
    b = build_model(model_cfg(*over), "causal_lm")
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na  # eval, merge and generate rebuild the same MoE from config.yaml
    with pytest.raises(FtuneError, match="upcycle_top_k=5"):
        build_model(model_cfg(*over[:2], "model.upcycle_top_k=5"), "causal_lm")
    with pytest.raises(FtuneError, match="qwen2"):
        build_model(model_cfg("tiny_qwen", "model.upcycle_experts=4"), "causal_lm")
    # a run on the upcycled model: its logits before training are the dense model's
    run = setup(compose_train(["model=tiny_llama", *over[1:], "method=moe", *TINY_RUN], tmp_path / "r"))
    dense = build_model(model_cfg("tiny_llama"), "causal_lm", pad_token_id=0)
    batch = fixed_batch(run)
    torch.testing.assert_close(logits_of(run.model, batch), logits_of(dense, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_upcycles_to_a_moe_with_the_same_logits(smollm2):
    cfg, _, _ = smollm2
    dense = build_model(cfg, "causal_lm")
    moe = upcycle(dense, 4, 2)
    ids = torch.randint(100, 40000, (1, 24))
    dense.eval(), moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
