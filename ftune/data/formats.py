"""Turn raw rows into token ids for each dataset format.

Every encoder returns a list of examples ``{"input_ids": [...], "labels": ...}`` (plus
``token_type_ids`` for BERT-style pairs). For causal-LM formats, ``labels`` is a list aligned with
``input_ids`` in which prompt tokens are -100 (not learned) unless ``train_on_prompt`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftune.config import DatasetConfig
from ftune.data.checks import label_id, normalize_label, require_columns
from ftune.errors import FtuneError

IGNORE = -100

PROMPT_TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}

# Chat templates for tokenizers that ship none (base models, the tiny test tokenizer).
FALLBACK_CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
        "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"
    ),
}


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    dropped_empty: int = 0
    notes: list[str] = field(default_factory=list)


def _require_columns(rows: list[dict], columns: list[str], what: str, source: str) -> None:
    require_columns(list(rows[0].keys()), columns, what, source)


def resolve_labels(cfg: DatasetConfig, train_rows: list[dict]) -> list[str]:
    """Class names in id order: from the config, else 0..max of integer labels, else the sorted labels.

    The rows' labels are already normalised (``ftune.data.checks.normalize_label``): ints or stripped strings.
    """
    if cfg.label_names:
        return [str(n).strip() for n in cfg.label_names]
    values = {r[cfg.label_column] for r in train_rows}
    if all(isinstance(v, int) for v in values):
        ints = sorted(values)
        if ints[0] < 0:
            raise FtuneError(
                f"Column '{cfg.label_column}' holds negative labels ({ints[0]}); class ids must be 0..N-1. "
                f"Remove unlabeled rows or set dataset.label_names."
            )
        return [str(i) for i in range(ints[-1] + 1)]
    return sorted({str(v) for v in values})


def encode_classification(rows, cfg: DatasetConfig, tokenizer, max_length: int, label_names: list[str] | None,
                          source: str) -> tuple[list[dict], EncodeStats]:
    """Tokenized examples with their class ids; ``label_names=None``: unlabelled rows (a domain's text
    without labels, as DANN's target), each example's label IGNORE."""
    cols = [cfg.text_column] + ([cfg.label_column] if label_names is not None else []) \
        + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    _require_columns(rows, cols, "classification" if label_names is not None else "unlabelled text", source)
    labels = [IGNORE] * len(rows) if label_names is None else []
    for n, r in enumerate(rows if label_names is not None else ()):
        label = label_id(normalize_label(r[cfg.label_column])[0], label_names, bool(cfg.label_names))
        if label is None:  # (build_data's row checks catch these first, with the line number)
            raise FtuneError(
                f"Row {n + 1} of '{source}' has label {r[cfg.label_column]!r}, which is not one of the classes "
                f"{label_names}. Fix the row, or list every class in dataset.label_names."
            )
        labels.append(label)
    texts = [str(r[cfg.text_column] or "") for r in rows]
    pairs = [str(r[cfg.text_pair_column] or "") for r in rows] if cfg.text_pair_column else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    stats = EncodeStats(rows=len(rows))
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        if not texts[i].strip():
            stats.dropped_empty += 1
            continue
        ex = {"input_ids": ids, "labels": labels[i]}
        if "token_type_ids" in enc:
            ex["token_type_ids"] = enc["token_type_ids"][i]
        out.append(ex)
    stats.kept = len(out)
    return out, stats


def _bos_ids(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself would prepend one (Llama), else []."""
    if tokenizer.bos_token_id is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []


def _join_segments(segments: list[tuple[list[int], bool]], max_length: int, train_on_prompt: bool,
                   stats: EncodeStats) -> dict | None:
    """Concatenate (ids, is_target) segments, cut to max_length; None if no target token is left."""
    ids: list[int] = []
    labels: list[int] = []
    for seg, is_target in segments:
        ids.extend(seg)
        labels.extend(seg if (is_target or train_on_prompt) else [IGNORE] * len(seg))
    if len(ids) > max_length:
        stats.truncated += 1
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(lab != IGNORE for lab in labels) or len(ids) < 2:
        stats.dropped_no_target += 1
        return None
    return {"input_ids": ids, "labels": labels}


def encode_instruction(rows, cfg: DatasetConfig, tokenizer, max_length: int, source: str):
    _require_columns(rows, [cfg.instruction_column, cfg.output_column], "instruction", source)
    if cfg.prompt_template not in PROMPT_TEMPLATES and cfg.prompt_template != "chat":
        raise FtuneError(
            f"Unknown dataset.prompt_template '{cfg.prompt_template}'; choose one of "
            f"{', '.join(list(PROMPT_TEMPLATES) + ['chat'])}."
        )
    stats = EncodeStats(rows=len(rows))
    if cfg.prompt_template == "chat":  # render as a one-turn conversation with the chat template
        convs = []
        for r in rows:
            user = str(r[cfg.instruction_column])
            extra = r.get(cfg.input_column) if cfg.input_column else None
            if extra:
                user = f"{user}\n\n{extra}"
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(r[cfg.output_column])}]
            if cfg.system_column and r.get(cfg.system_column):
                msgs.insert(0, {"role": "system", "content": str(r[cfg.system_column])})
            convs.append({"messages": msgs})
        return encode_chat(convs, cfg, tokenizer, max_length, source, column="messages")
    with_input, without_input = PROMPT_TEMPLATES[cfg.prompt_template]
    bos, eos = _bos_ids(tokenizer), [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts, outputs = [], []
    for r in rows:
        extra = r.get(cfg.input_column) if cfg.input_column else None
        template = with_input if extra else without_input
        prompts.append(template.format(instruction=r[cfg.instruction_column], input=extra or ""))
        outputs.append(str(r[cfg.output_column] or ""))
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    o_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    out = []
    for p, o in zip(p_ids, o_ids):
        if not o:
            stats.dropped_empty += 1
            continue
        ex = _join_segments([(bos + p, False), (o + eos, True)], max_length, cfg.train_on_prompt, stats)
        if ex is not None:
            out.append(ex)
    stats.kept = len(out)
    return out, stats


def chat_template_for(tokenizer, fallback: str | None) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    name = fallback or "chatml"
    if name not in FALLBACK_CHAT_TEMPLATES:
        raise FtuneError(
            f"The tokenizer has no chat template and model.chat_template='{name}' is not a known fallback; "
            f"choose one of {', '.join(FALLBACK_CHAT_TEMPLATES)}."
        )
    return FALLBACK_CHAT_TEMPLATES[name]


def encode_chat(rows, cfg: DatasetConfig, tokenizer, max_length: int, source: str, column: str | None = None,
                fallback_template: str | None = None):
    """Render conversations with the chat template; only assistant turns are learned."""
    column = column or cfg.messages_column
    _require_columns(rows, [column], "chat", source)
    template = chat_template_for(tokenizer, fallback_template)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)

    stats = EncodeStats(rows=len(rows))
    out = []
    for r in rows:
        msgs = r[column]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in msgs):
            raise FtuneError(
                f"Column '{column}' in '{source}' must hold lists of {{role, content}} messages; found {msgs!r:.80}."
            )
        # Split the rendered text into segments at every assistant turn by rendering growing prefixes.
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = render(msgs[:i], True)
                segments.append((prompt[len(done):], False))
                full = render(msgs[: i + 1], False)
                segments.append((full[len(prompt):], True))
                done = full
        if not segments:
            stats.dropped_no_target += 1
            continue
        ids = [(tokenizer(text, add_special_tokens=False)["input_ids"], tgt) for text, tgt in segments]
        if eos and ids[-1][0][-1:] != eos and tokenizer.eos_token not in segments[-1][0]:
            ids[-1] = (ids[-1][0] + eos, True)
        ex = _join_segments([(_bos_ids(tokenizer) + ids[0][0], ids[0][1])] + ids[1:], max_length,
                            cfg.train_on_prompt, stats)
        if ex is not None:
            out.append(ex)
    stats.kept = len(out)
    return out, stats


def encode_text(rows, cfg: DatasetConfig, tokenizer, max_length: int, source: str):
    """Continued pretraining: every token is learned; `pack` concatenates rows into full blocks."""
    _require_columns(rows, [cfg.text_column], "text", source)
    stats = EncodeStats(rows=len(rows))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = [str(r[cfg.text_column] or "") for r in rows]
    ids = [_bos_ids(tokenizer) + x + eos for x, t in
           zip(tokenizer(texts, add_special_tokens=False)["input_ids"], texts) if t.strip()]
    stats.dropped_empty = len(texts) - len(ids)
    if cfg.pack:
        stream = [t for x in ids for t in x]
        blocks = [stream[i:i + max_length] for i in range(0, len(stream) - 1, max_length)]
        out = [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]
    else:
        out = []
        for x in ids:
            if len(x) > max_length:
                stats.truncated += 1
                x = x[:max_length]
            if len(x) > 1:
                out.append({"input_ids": x, "labels": list(x)})
    stats.kept = len(out)
    return out, stats


def encode_masked_text(rows, cfg: DatasetConfig, tokenizer, max_length: int, source: str):
    """Masked-LM continued pretraining (encoders): each row tokenized with the model's special tokens
    ([CLS] ... [SEP]), truncated to ``max_length``; which tokens are masked is drawn per batch
    (:class:`ftune.data.collate.MaskingCollator`)."""
    _require_columns(rows, [cfg.text_column], "text", source)
    stats = EncodeStats(rows=len(rows))
    texts = [str(r[cfg.text_column] or "") for r in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        if not texts[i].strip():
            stats.dropped_empty += 1
            continue
        ex = {"input_ids": ids}
        if "token_type_ids" in enc:
            ex["token_type_ids"] = enc["token_type_ids"][i]
        out.append(ex)
    stats.kept = len(out)
    return out, stats


# masked_text: raw text for masked-LM continued pretraining of an encoder (strategy=domain_adapt's first stage)
TASK_OF_FORMAT = {"classification": "seq_cls", "instruction": "causal_lm", "chat": "causal_lm", "text": "causal_lm",
                  "masked_text": "masked_lm"}
