"""Data for the continual-learning recipes: TREC, SST-2 and RTE, each as classification CSVs (MiniLM, a head
per task) and as instruction JSONL with one-word answers (SmolLM2, one output space, exact match).

    python scripts/make_continual_data.py [--data ../shared/data] [--out data/continual] [--n-train 1000]
        [--n-test 500]

Writes, per task, ``<task>_train.csv``/``<task>_test.csv`` (columns text[, text2], label) and
``<task>_train.jsonl``/``<task>_test.jsonl`` ({instruction, input, output}): ``--n-train`` training rows and
``--n-test`` evaluation rows, each a seeded (0) sample of the task's training file and of its labelled
held-out file (TREC_10.label, SST-2 dev.tsv, RTE dev.tsv: the test files of SST-2 and RTE have no labels
in GLUE, so dev is the held-out set here). Answers: TREC's coarse class as a word, SST-2 positive/negative,
RTE yes/no (the hypothesis follows from the premise).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREC = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
        "NUM": "number"}
INSTRUCTIONS = {
    "trec": "What kind of answer does this question ask for? Reply with one word: abbreviation, description, "
            "entity, human, location or number.",
    "sst2": "Is the sentiment of this movie review positive or negative? Reply with one word.",
    "rte": "Does the second sentence follow from the first? Reply with one word: yes or no.",
}


def read_trec(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, question = line.split(" ", 1)
            rows.append({"text": question.strip(), "label": TREC[label.split(":")[0]]})
    return rows


def read_tsv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def sst2(path: Path) -> list[dict]:
    return [{"text": r.get("sentence") or r["content"], "label": "positive" if r["label"] == "1" else "negative"}
            for r in read_tsv(path)]


def rte(path: Path) -> list[dict]:
    return [{"text": r["sentence1"], "text2": r["sentence2"],  # GLUE RTE: 0 = entailment
             "label": "entailment" if r["label"] == "0" else "not_entailment"} for r in read_tsv(path)]


def instruction(task: str, row: dict) -> dict:
    if task == "rte":
        return {"instruction": INSTRUCTIONS[task], "input": f"{row['text']}\n{row['text2']}",
                "output": "yes" if row["label"] == "entailment" else "no"}
    return {"instruction": INSTRUCTIONS[task], "input": row["text"], "output": row["label"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("data/continual"))
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=500)
    args = parser.parse_args()
    d = args.data
    tasks = {"trec": (read_trec(d / "trec/train_5500.label"), read_trec(d / "trec/TREC_10.label")),
             "sst2": (sst2(d / "sst2/train.tsv"), sst2(d / "sst2/dev.tsv")),
             "rte": (rte(d / "rte/train.tsv"), rte(d / "rte/dev.tsv"))}
    args.out.mkdir(parents=True, exist_ok=True)
    for task, (train, test) in tasks.items():
        for split, rows, n in (("train", train, args.n_train), ("test", test, args.n_test)):
            rows = list(rows)
            random.Random(0).shuffle(rows)
            rows = rows[:n]
            columns = ["text", "text2", "label"] if task == "rte" else ["text", "label"]
            with (args.out / f"{task}_{split}.csv").open("w", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(rows)
            (args.out / f"{task}_{split}.jsonl").write_text(
                "".join(json.dumps(instruction(task, r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            labels = sorted({r["label"] for r in rows})
            print(f"{task} {split}: {len(rows)} rows, labels {labels}")


if __name__ == "__main__":
    main()
