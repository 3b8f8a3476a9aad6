"""TREC question classification cast as instruction following, plus a held-out slice of alpaca_en_demo.

    python scripts/make_trec_sft.py [--data ../shared/data] [--out data/trec_sft] [--n-train 1000]

Writes, as JSON lines of {instruction, input, output}:
- train.jsonl: ``--n-train`` questions sampled (seed 0) from TREC's 5,452 training questions; the answer is
  the coarse class of the question's answer as a word (abbreviation, description, entity, human,
  location, number), scored by exact match;
- test.jsonl: TREC's 500 test questions (TREC_10.label);
- alpaca_heldout.jsonl: the last 50 of alpaca_en_demo's 999 examples, for held-out perplexity: how much
  general instruction following a fine-tuned model kept.

The files are read as their SOURCE.txt says (TREC: one ``COARSE:fine question`` per line, latin-1).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
           "NUM": "number"}
INSTRUCTION = ("What kind of answer does this question ask for? Reply with one word: abbreviation, description, "
               "entity, human, location or number.")


def read_trec(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        label, question = line.split(" ", 1)
        rows.append({"instruction": INSTRUCTION, "input": question.strip(), "output": CLASSES[label.split(":")[0]]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("data/trec_sft"))
    parser.add_argument("--n-train", type=int, default=1000)
    args = parser.parse_args()
    train = read_trec(args.data / "trec" / "train_5500.label")
    test = read_trec(args.data / "trec" / "TREC_10.label")
    random.Random(0).shuffle(train)
    alpaca = json.loads((args.data / "alpaca_en_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train[: args.n_train])
    write_jsonl(args.out / "test.jsonl", test)
    write_jsonl(args.out / "alpaca_heldout.jsonl", alpaca[-50:])
    counts = {c: sum(r["output"] == c for r in train[: args.n_train]) for c in CLASSES.values()}
    print(f"wrote {args.out}: train {args.n_train} {counts}, test {len(test)}, alpaca_heldout 50")


if __name__ == "__main__":
    main()
