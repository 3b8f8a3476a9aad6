"""The measured table of recipes/sst2_rte_trec_minilm_multitask.yaml: one MiniLM-L6 + LoRA trained on SST-2,
RTE and TREC at once (a head per task) beside each task trained alone, the same steps in all (the recipe's
450 steps: 3 x 150 alone), and the multi-task model at 150 steps too (as many as each alone run).

    python scripts/make_multitask_data.py --data ../shared/data --out data/mtl      # once
    python scripts/table_multitask.py [--work runs/multitask] [--steps N]

Every run is the real CLI (`ftune train recipes=sst2_rte_trec_minilm_multitask ...`) in its own process, one
after the other. "Alone" is the same recipe with strategy.tasks holding that task only: the same model,
method, head, optimizer and schedule, on one task's batches. A finished run is reused.
Prints a Markdown table, also written to <work>/multitask.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FTUNE = str(Path(sys.executable).parent / "ftune")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
RECIPE = ROOT / "recipes" / "sst2_rte_trec_minilm_multitask.yaml"


def train(out: Path, *overrides: str) -> dict:
    """``ftune train`` of the recipe into ``out`` unless a finished run is there; its metrics.json."""
    if not (out / "metrics.json").exists():
        cmd = [FTUNE, "train", "recipes=sst2_rte_trec_minilm_multitask", *overrides, f"output_dir={out}",
               "overwrite=true", "trainer.progress=false"]
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT, env=ENV).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}")
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    return json.loads((out / "metrics.json").read_text())


def flow(value) -> str:
    """A YAML value in Hydra's command-line flow syntax."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "multitask")
    parser.add_argument("--steps", type=int, default=None, help="the multi-task run's steps (default: the recipe's)")
    args = parser.parse_args()
    recipe = yaml.safe_load(RECIPE.read_text())
    tasks, names = recipe["strategy"]["tasks"], [t["name"] for t in recipe["strategy"]["tasks"]]
    steps = args.steps or recipe["trainer"]["max_steps"]
    per = steps // len(tasks)  # each alone run: the multi-task run's steps shared out
    runs = {f"multi-task ({' + '.join(names)}), {steps} steps": train(args.work / f"multitask_{steps}",
                                                                      f"trainer.max_steps={steps}")}
    for task in tasks:
        runs[f"{task['name']} alone, {per} steps"] = train(args.work / f"alone_{task['name']}_{per}",
                                                           f"trainer.max_steps={per}", f"strategy.tasks={flow([task])}")
    runs[f"multi-task, {per} steps (as many as each alone run)"] = train(args.work / f"multitask_{per}",
                                                                          f"trainer.max_steps={per}")
    header = ["run", *[f"{n} accuracy" for n in names], "macro accuracy", "steps", "training s"]
    rows = []
    for name, m in runs.items():
        accs = [m.get(f"eval/{n}/accuracy") for n in names]
        rows.append([name, *("-" if a is None else f"{a:.4f}" for a in accs),
                     "-" if None in accs else f"{m['eval/macro_accuracy']:.4f}", str(m["train_steps"]),
                     f"{m['train_runtime_s']:.0f}"])
    alone = [runs[f"{n} alone, {per} steps"] for n in names]
    accs = [m[f"eval/{n}/accuracy"] for n, m in zip(names, alone, strict=True)]
    rows.insert(len(names) + 1, [f"each task alone ({len(names)} models, {steps} steps in all)",
                                 *(f"{a:.4f}" for a in accs), f"{sum(accs) / len(accs):.4f}",
                                 f"{len(names)} x {per}", f"{sum(m['train_runtime_s'] for m in alone):.0f}"])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "multitask.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
