"""The TREC recipe's table: zero-shot SmolLM2-135M-Instruct beside LoRA, QLoRA and full fine-tuning.

    python scripts/make_trec_sft.py --data ../shared/data --out data/trec_sft    # once
    python scripts/table_trec_smollm2.py [--data data/trec_sft] [--work runs/trec_table] [--rows zero,lora,qlora,full]

Every row is the real CLI in its own process, one after the other (recipes/trec_smollm2_lora.yaml):
  zero-shot  `ftune eval model=smollm2` on the 500 test questions (exact match) and on 50 held-out
             alpaca_en_demo examples (perplexity): the base model, no training
  lora       `ftune train recipes=trec_smollm2_lora`, then `ftune eval run=...` on the alpaca slice
  qlora      the same with method=qlora (the base in 4-bit NF4)
  full       the same with method=full optimizer.lr=5e-5

Columns: exact match on TREC's test set, held-out alpaca perplexity (how much general instruction
following the tuned model kept), trainable parameters, seconds of training, the training process's
wall time and its peak RSS (ru_maxrss). Prints a Markdown table, also written to <work>/table.md.
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
TRAIN = {"lora": [], "qlora": ["method=qlora"], "full": ["method=full", "optimizer.lr=5e-5"]}


def run(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` (stdout streamed); (wall seconds, peak RSS MB of that process)."""
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def alpaca_eval(data: Path, out: Path, *source: str) -> float:
    run([FTUNE, "eval", *source, "dataset=instruction", f"dataset.path={data / 'alpaca_heldout.jsonl'}",
         "dataset.prompt_template=chat", "eval.split=all", "eval.max_length=512", f"out={out}"])
    return json.loads((out / "eval.json").read_text())["eval/perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "trec_sft")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "trec_table")
    ap.add_argument("--rows", default="zero,lora,qlora,full")
    args = ap.parse_args()
    data, work = args.data.resolve(), args.work.resolve()
    if not (data / "train.jsonl").exists():
        sys.exit(f"{data}/train.jsonl is missing: run python scripts/make_trec_sft.py --out {data} first.")
    work.mkdir(parents=True, exist_ok=True)
    paths = [f"dataset.path={data / 'train.jsonl'}", f"dataset.eval_path={data / 'test.jsonl'}"]
    rows = []
    for name in args.rows.split(","):
        if name == "zero":
            out = work / "zero-shot"
            wall, rss = run([FTUNE, "eval", "model=smollm2", "dataset=instruction", f"dataset.path={data / 'test.jsonl'}",
                             "dataset.prompt_template=chat", "eval.split=all", "eval.scorer=exact_match",
                             "eval.max_new_tokens=6", "eval.max_length=128", f"out={out}"])
            em = json.loads((out / "eval.json").read_text())["eval/exact_match"]
            rows.append(("zero-shot", em, alpaca_eval(data, work / "zero-shot-alpaca", "model=smollm2"), 0, 0.0, wall, rss))
            continue
        out = work / name
        wall, rss = run([FTUNE, "train", "recipes=trec_smollm2_lora", *TRAIN[name], *paths, f"output_dir={out}",
                         "overwrite=true", "trainer.eval_max_new_tokens=6"])
        m = json.loads((out / "metrics.json").read_text())
        ppl = alpaca_eval(data, work / f"{name}-alpaca", f"run={out}")
        rows.append((name, m["eval/exact_match"], ppl, m["trainable_params"], m["train_runtime_s"], wall, rss))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    lines = ["| run | TREC test exact match | alpaca held-out perplexity | trainable params | training s | "
             "wall s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.2f} | {r[3]:,} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:,.0f} |" for r in rows]
    lines.append(f"\n(load average at the end: {load}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    table = "\n".join(lines)
    (work / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
