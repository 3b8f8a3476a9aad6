"""SST-2, RTE and TREC as classification files for the multi-task recipe (recipes/sst2_rte_trec_minilm_multitask.yaml).

    python scripts/make_multitask_data.py [--data ../shared/data] [--out data/mtl] [--n-sst2 8000]

Writes JSON lines of {text, label} (RTE also text_pair), read as each SOURCE.txt says:
- sst2_train.jsonl: ``--n-sst2`` sentences sampled (seed 0) from SST-2's 67,349; sst2_dev.jsonl: its 872 dev
  sentences (TSV, label first, no quoting); labels negative / positive;
- rte_train.jsonl, rte_dev.jsonl: RTE's 2,490 / 277 premise-hypothesis pairs (TSV, no quoting; GLUE's 0 =
  entailment, 1 = not_entailment);
- trec_train.jsonl, trec_test.jsonl: TREC's 5,452 / 500 questions (``COARSE:fine question`` per line,
  latin-1), labelled by their coarse class (ABBR, DESC, ENTY, HUM, LOC, NUM).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_tsv(path: Path) -> list[list[str]]:
    """Rows of a TSV without quoting (text holds '"'), header dropped."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]


def sst2(path: Path) -> list[dict]:
    return [{"text": text, "label": ["negative", "positive"][int(label)]} for label, text in read_tsv(path)]


def rte(path: Path) -> list[dict]:
    return [{"text": s1, "text_pair": s2, "label": ["entailment", "not_entailment"][int(label)]}
            for s1, s2, label, _ in read_tsv(path)]


def trec(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, question = line.split(" ", 1)
            rows.append({"text": question.strip(), "label": label.split(":")[0]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "mtl")
    parser.add_argument("--n-sst2", type=int, default=8000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = sst2(args.data / "sst2" / "train.tsv")
    random.Random(0).shuffle(train)
    files = {"sst2_train": train[:args.n_sst2], "sst2_dev": sst2(args.data / "sst2" / "dev.tsv"),
             "rte_train": rte(args.data / "rte" / "train.tsv"), "rte_dev": rte(args.data / "rte" / "dev.tsv"),
             "trec_train": trec(args.data / "trec" / "train_5500.label"),
             "trec_test": trec(args.data / "trec" / "TREC_10.label")}
    for name, rows in files.items():
        write_jsonl(args.out / f"{name}.jsonl", rows)
        print(f"{args.out / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
