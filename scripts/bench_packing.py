"""Padding of padded batches vs trainer.packing=true, and tokens/s of a short run each way.

    python scripts/bench_packing.py                                  # alpaca_en_demo, cutoff 256, batch 8
    python scripts/bench_packing.py --tokenizer /path/to/tokenizer --vocab-size 49152 --steps 40

Encodes the data exactly as `ftune train` does (alpaca template, prompt tokens not learned), then
counts, over one epoch of batches, the share of computed token slots that are padding: random
batches (trainer.group_by_length=false), length-grouped batches (the default) and packed rows
(none by construction; it reports how full the rows are). With --steps it then trains a tiny Llama
(model=tiny_llama, its vocabulary resized to the tokenizer's, LoRA) for that many steps with random
batches, length-grouped batches and packed rows, one run after the other, and prints the real
(non-pad) tokens per second of each. Timings on a shared machine are rough.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from ftune.config import DatasetConfig
    from ftune.data import build_data
    from ftune.data.collate import epoch_batches
    from ftune.packing import packed_batches

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "alpaca_en_demo" /
                    "alpaca_en_demo.json")
    ap.add_argument("--tokenizer", default=str(ROOT / "ftune" / "assets" / "tiny_tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=1024, help="the tiny Llama's vocabulary (>= the tokenizer's)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="also time this many training steps each way")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for both timed runs")
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    cfg = DatasetConfig(name="bench", format="instruction", path=str(a.data), prompt_template="alpaca")
    lengths = [len(e["input_ids"]) for e in build_data(cfg, tok, a.max_length, a.seed).train]
    real = sum(lengths)
    print(f"{len(lengths)} examples, {real} tokens (cutoff {a.max_length}, mean {real / len(lengths):.1f}, "
          f"{sum(n == a.max_length for n in lengths)} truncated); batch {a.batch_size}")
    for name, grouped in (("random batches", False), ("length-grouped batches", True)):
        batches = epoch_batches(lengths, a.batch_size, a.seed, 0, grouped)
        slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        print(f"{name:<24} {len(batches):>4} batches  {slots:>8} token slots  padding {1 - real / slots:6.1%}")
    budget = a.batch_size * a.max_length
    rows = packed_batches(lengths, budget, a.seed, 0)
    print(f"{'packed rows':<24} {len(rows):>4} rows     {real:>8} token slots  padding {0:6.1%}  "
          f"(rows {real / len(rows) / budget:.1%} full of {budget} tokens on average)")

    if a.steps:
        common = ["model=tiny_llama", f"model.tokenizer={a.tokenizer}", f"model.config.vocab_size={a.vocab_size}",
                  "dataset=instruction", f"dataset.path={a.data}", "dataset.prompt_template=alpaca", "method=lora",
                  f"trainer.max_length={a.max_length}", f"trainer.batch_size={a.batch_size}",
                  f"trainer.max_steps={a.steps}", "trainer.progress=false", "trainer.device=cpu", f"seed={a.seed}",
                  *a.extra]
        work = Path(tempfile.mkdtemp(prefix="ftune-packing-"))
        for name, extra in (("padded, random", ["trainer.packing=false", "trainer.group_by_length=false"]),
                            ("padded, length-grouped", ["trainer.packing=false", "trainer.group_by_length=true"]),
                            ("packed", ["trainer.packing=true"])):
            out = work / name.replace(", ", "_")
            res = subprocess.run([str(Path(sys.executable).parent / "ftune"), "train", *common, *extra,
                                  f"output_dir={out}"], capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{name} run failed:\n{(res.stdout + res.stderr)[-2000:]}")
            m = json.loads((out / "metrics.json").read_text())
            first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            print(f"{name:<24} {a.steps:>4} steps  {m['train_runtime_s']:7.1f} s  {m['tokens_per_s']:9.0f} real tokens/s"
                  f"  first logged loss {first['loss']:.4f}  eval/loss {m.get('eval/loss', float('nan')):.4f}")


if __name__ == "__main__":
    main()
