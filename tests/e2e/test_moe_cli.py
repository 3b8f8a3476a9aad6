"""MoE fine-tuning through the real `ftune` CLI: train, the routing report, reload for eval."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from PIL import Image

from conftest import run_cli

TINY = ["dataset=demo_instructions", "trainer=smoke", "trainer.max_steps=4", "dataset.max_samples=64",
        "dataset.max_eval_samples=16"]


def train_and_eval(out, *overrides: str) -> tuple[dict, list[dict], dict]:
    res = run_cli("train", *TINY, *overrides, f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    res = run_cli("eval", f"run={out}")  # the run's model rebuilt from config.yaml, its weights loaded on it
    assert res.returncode == 0, res.stdout + res.stderr
    return metrics, rows, json.loads((out / "eval.json").read_text())


def test_moe_run_reports_routing_and_reloads(tmp_path):
    out = tmp_path / "moe"
    metrics, rows, evaluated = train_and_eval(out, "model=tiny_mixtral", "method=moe", "method.train=router_experts",
                                              "optimizer.lr=1e-2")
    assert metrics["moe/router_trains"] is True and metrics["moe/aux_loss_coef"] == 0.001
    assert all("moe/aux_loss" in r for r in rows if "loss" in r)  # logged at every training row
    for when in ("before", "after"):
        loads = metrics[f"moe/load_{when}"]
        assert len(loads) == 2 and all(len(r) == 4 and math.isclose(sum(r), 1, abs_tol=1e-5) for r in loads)
        assert 0 < metrics[f"moe/entropy_{when}"] <= metrics["moe/max_entropy"] == pytest.approx(math.log(4))
    assert 0 < metrics["moe/changed_topk_share"] <= 1  # at lr 1e-2 the router moves some tokens
    assert Image.open(out / "moe.png").size[0] > 300
    card = (out / "README.md").read_text()
    assert "## Routing (MoE)" in card and "| 1 |" in card
    assert evaluated["eval/loss"] == pytest.approx(metrics["eval/loss"], rel=1e-5)


@pytest.mark.slow  # the upcycled reload is also checked by test_eval_merge (merge round trip of method=moe)
def test_upcycled_llama_with_lora_on_experts_and_attention_reloads(tmp_path):
    out = tmp_path / "upcycled"
    metrics, rows, evaluated = train_and_eval(out, "model=tiny_llama", "model.upcycle_experts=4",
                                              "model.upcycle_top_k=2", "method=lora", "method.target_experts=true",
                                              "method.dropout=0", "optimizer.lr=1e-2")
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["upcycle_experts"] == 4
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert metrics["moe/router_trains"] is False and not any("moe/aux_loss" in r for r in rows)
    assert evaluated["eval/loss"] == pytest.approx(metrics["eval/loss"], rel=1e-5)
