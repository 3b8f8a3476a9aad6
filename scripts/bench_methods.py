"""Every method on the same job: SST-2 with the pretrained MiniLM, one Hydra multirun, then compare.

    python scripts/bench_methods.py                              # all methods, 4,000 sentences, 1 epoch
    python scripts/bench_methods.py --methods lora,dora,ia3 --n-train 8000
    python scripts/bench_methods.py --methods adalora --extra optimizer.lr=1e-3,1e-2 --out outputs/probe
                                                                 # a comma list in --extra is one more sweep axis

Same data, batch size, sequence length, schedule and epochs for every method; each method trains at
the learning rate of its own YAML (configs/method/<name>.yaml). Writes the sweep to --out and the
comparison (table, CSV, plot of dev accuracy vs trainable parameters) beside it via `ftune compare`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"peft"}  # the generic pass-through has no fixed method of its own


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from ftune.methods import METHODS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--bench", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--methods", default=",".join(m for m in sorted(METHODS) if m not in SKIP))
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_methods")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every job")
    args = ap.parse_args()

    csv_dir = Path(tempfile.mkdtemp(prefix="ftune-sst2-"))
    subprocess.run([sys.executable, str(args.bench / "make_csv.py"), "sst2", str(args.data), str(csv_dir),
                    str(args.n_train)], check=True)
    ftune = str(Path(sys.executable).parent / "ftune")
    cmd = [ftune, "train", "-m", f"method={args.methods}", "model=minilm", "dataset=classification",
           f"dataset.path={csv_dir / 'train.csv'}", f"dataset.eval_path={csv_dir / 'dev.csv'}",
           f"trainer.epochs={args.epochs}", "trainer.batch_size=32", "trainer.max_length=128",
           "trainer.progress=false", "seed=0", f"output_dir={args.out}", *args.extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    subprocess.run([ftune, "compare", str(args.out)], check=True)


if __name__ == "__main__":
    main()
