"""The upcycled-SmolLM2 MoE recipe's table, from finished runs of recipes/alpaca_smollm2_upcycled_moe.yaml.

    ftune train recipes=alpaca_smollm2_upcycled_moe output_dir=runs/moe/router_experts
    ftune train recipes=alpaca_smollm2_upcycled_moe method.train=router output_dir=runs/moe/router
    ftune train recipes=alpaca_smollm2_upcycled_moe method=lora method.target_experts=true method.dropout=0 \\
        output_dir=runs/moe/lora_experts
    python scripts/table_moe_upcycled.py runs/moe/router_experts runs/moe/router runs/moe/lora_experts

One row per run directory: held-out loss before -> after training (eval_before/loss, eval/loss), the
load-balancing loss at the first and last logged step (router-training runs), mean router entropy and
load imbalance (coefficient of variation over experts) before -> after, the share of tokens whose top-k
experts changed, trainable parameters, seconds of training and peak memory. Prints a Markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    aux = [r["moe/aux_loss"] for r in rows if "moe/aux_loss" in r]
    aux_text = f"{aux[0]:.3f} -> {aux[-1]:.3f}" if aux else "off"
    return (f"| {run.name} | {m['eval_before/loss']:.3f} -> {m['eval/loss']:.3f} | {aux_text} | "
            f"{m['moe/entropy_before']:.3f} -> {m['moe/entropy_after']:.3f} | "
            f"{m['moe/load_cv_before']:.3f} -> {m['moe/load_cv_after']:.3f} | {m['moe/changed_topk_share']:.3f} | "
            f"{m['trainable_params']:,} | {m['train_runtime_s']:.0f} | {m['peak_memory_mb']:,.0f} |")


def main(runs: list[str]) -> None:
    print("| run | eval loss before -> after | aux loss first -> last | router entropy before -> after "
          "| load CV before -> after | top-k changed | trainable params | train s | peak MB |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    for run in runs:
        print(row(Path(run)))


if __name__ == "__main__":
    main(sys.argv[1:])
