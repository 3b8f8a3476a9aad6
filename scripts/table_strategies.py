"""The measured tables of the strategy recipes: distillation (SST-2 with MiniLM, TREC with SmolLM2)
and domain adaptation (SST-2 movie reviews -> ftune's bundled product reviews).

    python ../shared/bench/make_csv.py sst2 ../shared/data data/sst2 8000        # once (distill, domain)
    python scripts/make_trec_sft.py --data ../shared/data --out data/trec_sft    # once (causal)
    python scripts/table_strategies.py [--tables distill,domain,causal] [--work runs/strategies]

Every training run is the real CLI in its own process, one after the other:

  distill  recipes/sst2_minilm_full (the teacher, 6 blocks), recipes/sst2_minilm_distill (a 3-block
           student cut from the teacher's blocks 0, 2, 4, distilled) and the same student with
           strategy.alpha=0 (no teacher: labels only). Columns: SST-2 dev accuracy, % of the
           teacher's, parameters, inference examples/s on the dev set (all models timed in this
           process, interleaved, best of 3 passes) and the speed-up over the teacher.
  domain   source only (recipes/sst2_reviews_minilm_dann with strategy.domain_weight=0), continued
           pretraining then fine-tuning (recipes/sst2_reviews_minilm_domain_adapt), DANN
           (recipes/sst2_reviews_minilm_dann) with the domain loss at full weight and at the recipe's 0.1. Columns: accuracy on the target domain's eval file
           (`ftune eval run=... dataset=sentiment`, the same for all three), SST-2 dev accuracy, the
           DANN domain classifier's accuracy over training.
  causal   recipes/trec_smollm2_distill: the TREC LoRA run of scripts/table_trec_smollm2.py (its
           teacher, trained here first when missing) distilled into a half-depth student (15 of 30
           blocks), beside the same student without a teacher. Columns: TREC test loss and exact
           match, parameters, inference tokens/s (timed as above) and the speed-up.

Prints Markdown tables, also written to <work>/<table>.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTUNE = str(Path(sys.executable).parent / "ftune")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(cmd: list[str]) -> float:
    """Run ``cmd`` (stdout streamed); its wall seconds."""
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT, env=ENV).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - started


def train(out: Path, *overrides: str) -> dict:
    """``ftune train`` into ``out`` unless a finished run is there; its metrics.json."""
    if not (out / "metrics.json").exists():
        run([FTUNE, "train", *overrides, f"output_dir={out}", "overwrite=true", "trainer.progress=false"])
    return json.loads((out / "metrics.json").read_text())


def eval_json(run_dir: Path, out: Path, *overrides: str) -> dict:
    if not (out / "eval.json").exists():
        run([FTUNE, "eval", f"run={run_dir}", *overrides, f"out={out}"])
    return json.loads((out / "eval.json").read_text())


def throughput(models: dict[str, object], batches: list[dict], count: str) -> dict[str, float]:
    """Examples (count="examples") or tokens per second of each model's forward over ``batches``,
    interleaved (teacher, student, student, ... three times) so that load changes hit all alike; best pass."""
    import torch

    best = dict.fromkeys(models, float("inf"))
    with torch.no_grad():
        for _ in range(3):
            for name, model in models.items():
                started = time.perf_counter()
                for b in batches:
                    model(**b)
                best[name] = min(best[name], time.perf_counter() - started)
    n = sum(len(b["input_ids"]) if count == "examples" else int(b["attention_mask"].sum()) for b in batches)
    return {name: n / s for name, s in best.items()}


def load(run_dir: Path):
    from ftune.runs import load_run

    loaded = load_run(run_dir)
    loaded.model.eval()
    return loaded


def md(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def distill_table(work: Path, sst2: Path) -> str:
    data = [f"dataset.path={sst2 / 'train.csv'}", f"dataset.eval_path={sst2 / 'dev.csv'}"]
    teacher_dir, kd_dir, l3_dir = work / "sst2_teacher", work / "sst2_student_kd", work / "sst2_student_l3"
    teacher = train(teacher_dir, "recipes=sst2_minilm_full", *data)
    kd = train(kd_dir, "recipes=sst2_minilm_distill", f"strategy.teacher={teacher_dir}", *data)
    l3 = train(l3_dir, "recipes=sst2_minilm_distill", f"strategy.teacher={teacher_dir}", "strategy.alpha=0", *data)
    runs = {"teacher (6 blocks)": teacher_dir, "student, distilled (3 blocks)": kd_dir,
            "student, no teacher (3 blocks)": l3_dir}
    loaded = {name: load(d) for name, d in runs.items()}
    tok = loaded["teacher (6 blocks)"].tokenizer
    with (sst2 / "dev.csv").open(encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    batches = [dict(tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(texts), 32)]
    speed = throughput({n: lr.model for n, lr in loaded.items()}, batches, "examples")
    params = {n: sum(p.numel() for p in lr.model.parameters()) for n, lr in loaded.items()}
    metrics = dict(zip(runs, (teacher, kd, l3), strict=True))
    t_acc, t_name = teacher["eval/accuracy"], "teacher (6 blocks)"
    rows = [[n, f"{m['eval/accuracy']:.4f}", f"{100 * m['eval/accuracy'] / t_acc:.1f}%", f"{params[n]:,}",
             f"{100 * (1 - params[n] / params[t_name]):.0f}%", f"{speed[n]:.0f}", f"{speed[n] / speed[t_name]:.2f}x",
             f"{m['train_runtime_s']:.0f}"] for n, m in metrics.items()]
    return md(["model", "SST-2 dev accuracy", "% of teacher", "parameters", "fewer parameters",
               "inference examples/s", "speed vs teacher", "training s"], rows)


def domain_table(work: Path, sst2: Path) -> str:
    data = [f"dataset.path={sst2 / 'train.csv'}", f"dataset.eval_path={sst2 / 'dev.csv'}"]
    runs = {"source only (SST-2, LoRA)": (work / "domain_source_only",
                                          ["recipes=sst2_reviews_minilm_dann", "strategy.domain_weight=0"]),
            "continued pretraining (MLM on reviews) then SST-2": (work / "domain_continued",
                                                                  ["recipes=sst2_reviews_minilm_domain_adapt"]),
            "DANN (gamma=10), domain_weight=1": (work / "domain_dann",
                                                 ["recipes=sst2_reviews_minilm_dann", "strategy.domain_weight=1.0"]),
            "DANN (gamma=10), domain_weight=0.1 (the recipe)": (work / "domain_dann_w01",
                                                                ["recipes=sst2_reviews_minilm_dann"])}
    rows = []
    for name, (out, overrides) in runs.items():
        m = train(out, *overrides, *data)
        target = eval_json(out, work / f"{out.name}_target", "dataset=sentiment", "eval.split=eval")
        dom = m.get("strategy/domain_accuracy_mean")
        rows.append([name, f"{target['eval/accuracy']:.4f}", f"{m['eval/accuracy']:.4f}",
                     "-" if dom is None or "domain_weight=0" in " ".join(overrides) else f"{dom:.3f}",
                     f"{m['train_runtime_s']:.0f}"])
    return md(["run", "target (product reviews) accuracy", "source (SST-2 dev) accuracy",
               "domain classifier accuracy (mean)", "training s"], rows)


def causal_table(work: Path, trec: Path) -> str:
    data = [f"dataset.path={trec / 'train.jsonl'}", f"dataset.eval_path={trec / 'test.jsonl'}"]
    teacher_dir = ROOT / "runs" / "trec_table" / "lora"
    teacher = train(teacher_dir, "recipes=trec_smollm2_lora", *data, "trainer.eval_max_new_tokens=6")
    kd_dir, l15_dir = work / "trec_student_kd", work / "trec_student_l15"
    kd = train(kd_dir, "recipes=trec_smollm2_distill", f"strategy.teacher={teacher_dir}", *data)
    l15 = train(l15_dir, "recipes=trec_smollm2_distill", f"strategy.teacher={teacher_dir}", "strategy.alpha=0", *data)
    runs = {"teacher: SmolLM2 + LoRA (30 blocks)": (teacher_dir, teacher),
            "student, distilled (15 blocks)": (kd_dir, kd), "student, no teacher (15 blocks)": (l15_dir, l15)}
    loaded = {name: load(d) for name, (d, _) in runs.items()}
    tok = loaded["student, distilled (15 blocks)"].tokenizer
    tok.padding_side = "right"
    questions = [json.loads(line)["input"] for line in (trec / "test.jsonl").read_text().splitlines()[:256]]
    batches = [dict(tok(questions[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, len(questions), 16)]
    speed = throughput({n: lr.model for n, lr in loaded.items()}, batches, "tokens")
    params = {n: sum(p.numel() for p in lr.model.parameters()) for n, lr in loaded.items()}
    t_name = next(iter(runs))
    rows = [[n, f"{m['eval/loss']:.4f}", f"{m['eval/exact_match']:.3f}", f"{params[n]:,}", f"{speed[n]:.0f}",
             f"{speed[n] / speed[t_name]:.2f}x", f"{m['train_runtime_s']:.0f}"] for n, (_, m) in runs.items()]
    return md(["model", "TREC test loss", "TREC exact match", "parameters", "inference tokens/s",
               "speed vs teacher", "training s"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="distill,domain,causal")
    ap.add_argument("--sst2", type=Path, default=ROOT / "data" / "sst2")
    ap.add_argument("--trec", type=Path, default=ROOT / "data" / "trec_sft")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "strategies")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tables = {"distill": lambda: distill_table(work, args.sst2.resolve()),
              "domain": lambda: domain_table(work, args.sst2.resolve()),
              "causal": lambda: causal_table(work, args.trec.resolve())}
    for name in args.tables.split(","):
        need = args.trec if name == "causal" else args.sst2
        if not need.exists():
            sys.exit(f"{need} is missing: see the commands at the top of this script.")
        table = tables[name]()
        load_avg = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
        table += f"\n\n(load average at the end: {load_avg})"
        (work / f"{name}.md").write_text(table + "\n")
        print(f"\n## {name}\n\n{table}\n", flush=True)


if __name__ == "__main__":
    main()
