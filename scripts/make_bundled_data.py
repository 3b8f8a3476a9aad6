"""Write the small datasets and the tiny tokenizer that ship inside the ftune package.

    python scripts/make_bundled_data.py        # rewrites ftune/data/bundled/ and ftune/assets/tiny_tokenizer/

Everything is generated from templates with a fixed seed, so the files are reproducible and carry
no third-party license. They exist for the offline default job (`ftune train`) and the tests; real
work points `dataset.path` at a hub id or local file.

- sentiment_{train,eval}.jsonl: product/movie reviews with a positive/negative label. Eval
  sentences never occur in train; a fifth of the clauses carry a negation ("was not great") and
  three in ten reviews a contrast ("the cast was great, but the plot was dull": the clause after
  "but" decides), so a bag-of-words guess is not enough.
- instructions.jsonl: alpaca-style {instruction, input, output} rows of small deterministic tasks.
- chat.jsonl: the same tasks as {messages: [{role, content}, ...]} conversations.
- text.jsonl: {text} paragraphs for continued pretraining.
- dates_{train,eval}.jsonl: a date written the way people write it ("Tuesday, 7 March 2019",
  "Mar 7, 2019", "the 7th of March 2019") and the same date in ISO 8601 (2019-03-07); the default
  job's task. SmolLM2-135M-Instruct cannot do it zero-shot (exact match 0 of 30: it echoes the date,
  invents a time of day or a year), and it is learnable in a few dozen LoRA steps. Eval dates never
  occur in train.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "ftune" / "data" / "bundled"
TOK_OUT = ROOT / "ftune" / "assets" / "tiny_tokenizer"

POS = ["great", "wonderful", "delightful", "excellent", "charming", "brilliant", "moving", "superb",
       "enjoyable", "fantastic", "touching", "clever", "beautiful", "gripping", "lovely", "impressive"]
NEG = ["terrible", "boring", "awful", "dull", "disappointing", "clumsy", "tedious", "bland",
       "painful", "mediocre", "forgettable", "messy", "annoying", "lifeless", "shallow", "weak"]
SUBJECTS = ["the movie", "this film", "the acting", "the story", "the soundtrack", "the ending",
            "the script", "the camera work", "the dialogue", "the cast", "this book", "the plot",
            "the restaurant", "the service", "the hotel room", "this phone", "the battery", "the show"]
ADVERBS = ["", "really ", "truly ", "quite ", "very ", "remarkably ", "rather ", "simply "]
POS_CLAUSES = ["i would recommend it to anyone", "we left with a smile", "worth every minute",
               "i want to see it again", "it exceeded my hopes", "a pleasure from start to finish"]
NEG_CLAUSES = ["i want my money back", "we left early", "a waste of an evening",
               "i could not wait for it to end", "it fell flat", "i would not recommend it"]


def clause(rng: random.Random, label: int) -> str:
    negate = rng.random() < 0.2
    # A negated opposite word carries the label: "was not boring" is positive.
    words = (NEG if label == 1 else POS) if negate else (POS if label == 1 else NEG)
    subj, adv, adj = rng.choice(SUBJECTS), rng.choice(ADVERBS), rng.choice(words)
    verb = rng.choice(["was", "is", "felt", "seemed"])
    return f"{subj} {verb} {'not ' + adv if negate else adv}{adj}"


def review(rng: random.Random, label: int) -> str:
    core = clause(rng, label)
    if rng.random() < 0.3:
        # Contrast: the clause after "but" decides ("the cast was great, but the plot was dull").
        core = f"{clause(rng, 1 - label)}, but {core}"
    elif rng.random() < 0.5:
        tail = rng.choice(POS_CLAUSES if label == 1 else NEG_CLAUSES)
        core = f"{core}, {tail}" if rng.random() < 0.5 else f"{tail}: {core}"
    return core[0].upper() + core[1:] + rng.choice([".", "!", " ."])


def sentiment(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        label = rng.randint(0, 1)
        text = review(rng, label)
        if text in seen:  # keep eval sentences out of train and vice versa
            continue
        seen.add(text)
        rows.append({"text": text, "label": ["negative", "positive"][label]})
    return rows


OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "light": "dark",
             "happy": "sad", "early": "late", "full": "empty", "hard": "soft", "high": "low", "old": "new",
             "wet": "dry", "loud": "quiet", "rich": "poor", "strong": "weak"}
WORDS = ["cat", "house", "river", "apple", "green", "music", "table", "window", "garden", "paper",
         "stone", "cloud", "bread", "light", "train", "forest", "pencil", "candle", "horse", "bottle"]


def task(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        w = rng.choice(WORDS)
        return "Reverse the letters of the word.", w, w[::-1]
    if kind == 1:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return "Add the two numbers.", f"{a} and {b}", str(a + b)
    if kind == 2:
        w = rng.choice(list(OPPOSITES))
        return "Give the opposite of the word.", w, OPPOSITES[w]
    if kind == 3:
        w = rng.choice(WORDS)
        return "Write the word in capital letters.", w, w.upper()
    ws = rng.sample(WORDS, 3)
    return "Sort the words alphabetically.", ", ".join(ws), ", ".join(sorted(ws))


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DATE_STYLES = ["{d} {M} {y}", "{M} {d}, {y}", "{W}, {M} {d}, {y}", "{W}, {d} {M} {y}", "{m3} {d}, {y}",
               "{d} {m3} {y}", "the {o} of {M} {y}", "{M} {o}, {y}", "{d}. {M} {y}", "{m3}. {d} {y}"]


def ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def dates(rng: random.Random, n: int, seen: set) -> list[dict]:
    """Dates in the ways people write them -> ISO 8601. Each (date) is used once across splits."""
    import datetime

    rows = []
    while len(rows) < n:
        day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(200 * 365))
        if day in seen:
            continue
        seen.add(day)
        style = rng.choice(DATE_STYLES)
        text = style.format(d=day.day, M=MONTHS[day.month - 1], m3=MONTHS[day.month - 1][:3], y=day.year,
                            W=day.strftime("%A"), o=ordinal(day.day))
        rows.append({"instruction": "Write this date in ISO 8601 format (YYYY-MM-DD).", "input": text,
                     "output": day.isoformat()})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(corpus: list[str]) -> None:
    """A byte-level BPE tokenizer (vocab 1024) for the tiny Llama/Qwen/GPT-2 test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    TOK_OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(TOK_OUT)


def main() -> None:
    rng = random.Random(1234)
    OUT.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    train, evals = sentiment(rng, 2000, seen), sentiment(rng, 400, seen)
    write_jsonl(OUT / "sentiment_train.jsonl", train)
    write_jsonl(OUT / "sentiment_eval.jsonl", evals)

    tasks = [task(rng) for _ in range(600)]
    write_jsonl(OUT / "instructions.jsonl", [{"instruction": i, "input": x, "output": y} for i, x, y in tasks])
    chats = [{"messages": [{"role": "user", "content": f"{i}\n{x}"}, {"role": "assistant", "content": y}]}
             for i, x, y in tasks[:300]]
    write_jsonl(OUT / "chat.jsonl", chats)
    paragraphs = [" ".join(r["text"] for r in train[k:k + 6]) for k in range(0, 1200, 6)]
    write_jsonl(OUT / "text.jsonl", [{"text": p} for p in paragraphs])

    date_rng, seen_dates = random.Random(2026), set()  # its own seed: the files above do not change
    write_jsonl(OUT / "dates_train.jsonl", dates(date_rng, 2000, seen_dates))
    write_jsonl(OUT / "dates_eval.jsonl", dates(date_rng, 200, seen_dates))

    corpus = [r["text"] for r in train] + [f"{i} {x} {y}" for i, x, y in tasks]
    # The prompt templates' fixed text, so the tiny models' prompts stay a few dozen tokens long.
    from ftune.data.formats import FALLBACK_CHAT_TEMPLATES, PROMPT_TEMPLATES

    corpus += [t for pair in PROMPT_TEMPLATES.values() for t in pair] * 50
    corpus += list(FALLBACK_CHAT_TEMPLATES.values()) * 50
    build_tokenizer(corpus)
    print(f"wrote {OUT} and {TOK_OUT}")


if __name__ == "__main__":
    main()
