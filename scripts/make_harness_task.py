"""Write ftune's shipped lm-evaluation-harness task: dates_mc, a multiple-choice version of the dates data.

    python scripts/make_harness_task.py        # rewrites ftune/assets/harness/dates_mc.jsonl

Each held-out date of ftune/data/bundled/dates_eval.jsonl ("Tuesday, August 10, 1976") becomes a question
with four ISO 8601 answers: the right one and three near misses a model that half-learnt the format
makes (day and month swapped, the year's last two digits swapped or off by one, the month off by one).
Choices are shuffled with a fixed seed and stored as one space-separated string (the task YAML splits
it); ``label`` is the index of the right one. Train and few-shot
examples come from the first 20 training dates (never in the eval set).
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "ftune" / "data" / "bundled"
OUT = ROOT / "ftune" / "assets" / "harness"


def _iso(y: int, m: int, d: int) -> str:
    return f"{y:04d}-{m:02d}-{d:02d}"


def near_misses(iso: str) -> list[str]:
    """Three wrong ISO dates close to ``iso``, all valid dates, all different."""
    y, m, d = (int(x) for x in iso.split("-"))
    out: list[str] = []

    def add(yy: int, mm: int, dd: int) -> None:
        dd = min(dd, calendar.monthrange(yy, mm)[1])
        s = _iso(yy, mm, dd)
        if s != iso and s not in out:
            out.append(s)

    if d <= 12 and d != m:
        add(y, d, m)  # day and month swapped
    else:
        add(y, m, d % 28 + 1)
    swapped = int(f"{y // 100}{y % 10}{(y // 10) % 10}")
    add(swapped if swapped != y else y + 1, m, d)
    add(y, m % 12 + 1, d)
    for extra in (y - 1, y + 1, y + 10, y - 10):  # whatever collided
        if len(out) == 3:
            break
        add(extra, m, d)
    return out[:3]


def rows(source: Path, rng: random.Random, limit: int | None = None) -> list[dict]:
    out = []
    for line in source.read_text().splitlines()[:limit]:
        r = json.loads(line)
        choices = [r["output"], *near_misses(r["output"])]
        rng.shuffle(choices)
        # one string, not a list: the json loader (pyarrow) would read a list of ISO dates as timestamps
        out.append({"instruction": r["instruction"], "input": r["input"], "choices": " ".join(choices),
                    "label": choices.index(r["output"])})
    return out


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, source, limit in (("dates_mc.jsonl", BUNDLED / "dates_eval.jsonl", None),
                                ("dates_mc_fewshot.jsonl", BUNDLED / "dates_train.jsonl", 20)):
        data = rows(source, rng, limit)
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"wrote {OUT / name} ({len(data)} rows)")


if __name__ == "__main__":
    main()
