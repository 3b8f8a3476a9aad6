"""The measured tables of the continual-learning recipes: naive fine-tuning, EWC, replay and per-task adapters.

    python scripts/make_continual_data.py --data ../shared/data --out data/continual     # once
    python scripts/table_continual.py [--table smollm2|minilm] [--work runs/continual] [--nice 19]
        [--only naive,ewc,...] [-- extra overrides for every run]

Every run is the real CLI in its own process, one after the other (``nice -n 19`` by default, the machine
being shared), into <work>/<table>/<variant>; a finished run is reused. Then ``ftune compare`` over them,
and a Markdown table (also <work>/<table>.md): the accuracy matrix's last row (each task after the last
stage), the diagonal (each task right after its own stage), average accuracy, backward transfer,
forgetting, training seconds (all stages) and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTUNE = str(Path(sys.executable).parent / "ftune")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

TABLES = {
    "smollm2": ("continual_smollm2_lora", {
        "naive": [],
        "ewc": ["strategy.ewc_lambda=1000"],
        "replay": ["strategy.replay_ratio=0.25"],
        "per_task_lora": ["strategy.per_task_adapters=true"],
    }),
    "minilm": ("continual_minilm_heads", {
        "naive": [],
        "ewc": ["strategy.ewc_lambda=1000"],
        "replay": ["strategy.replay_ratio=0.25"],
        "per_task_lora": ["strategy.per_task_adapters=true"],
    }),
}


def train_seconds(run: Path) -> float:
    files = [run / "metrics.json", *sorted((run / "stages").glob("*/metrics.json"))]
    return sum(json.loads(f.read_text()).get("train_runtime_s", 0.0) for f in files if f.exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="smollm2")
    parser.add_argument("--work", type=Path, default=Path("runs/continual"))
    parser.add_argument("--nice", type=int, default=19)
    parser.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    parser.add_argument("extra", nargs="*", help="overrides for every run")
    args = parser.parse_args()
    recipe, variants = TABLES[args.table]
    chosen = args.only.split(",") if args.only else list(variants)
    out = args.work / args.table
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    for name in chosen:
        run_dir = out / name
        if (run_dir / "continual.json").exists():
            continue
        cmd = ["nice", "-n", str(args.nice), FTUNE, "train", f"recipes={recipe}", *variants[name], *args.extra,
               f"output_dir={run_dir}", "overwrite=true", "trainer.progress=false"]
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        if subprocess.run(cmd, cwd=ROOT, env=ENV).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}")
        walls[name] = time.perf_counter() - started
        (run_dir / "wall_s.txt").write_text(f"{walls[name]:.0f}\n")
    subprocess.run([FTUNE, "compare", *(str(out / n) for n in chosen), f"out={out}"], cwd=ROOT, env=ENV, check=True)
    lines = []
    for name in chosen:
        run_dir = out / name
        report = json.loads((run_dir / "continual.json").read_text())
        tasks, r = report["tasks"], report["matrix"]
        if not lines:
            lines = ["| run | " + " | ".join(f"{t} after its stage" for t in tasks) + " | "
                     + " | ".join(f"{t} at the end" for t in tasks)
                     + " | average accuracy | backward transfer | forgetting | training s | wall s |",
                     "|---|" + "---:|" * (2 * len(tasks) + 5)]
        wall = (run_dir / "wall_s.txt").read_text().strip() if (run_dir / "wall_s.txt").exists() else "-"
        lines.append(f"| {name} | " + " | ".join(f"{r[j][j]:.3f}" for j in range(len(tasks))) + " | "
                     + " | ".join(f"{v:.3f}" for v in r[-1]) + f" | {report['average_accuracy']:.3f} | "
                     f"{report['backward_transfer']:+.3f} | {report['forgetting']:.3f} | "
                     f"{train_seconds(run_dir):.0f} | {wall} |")
    text = "\n".join(lines)
    (args.work / f"{args.table}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
