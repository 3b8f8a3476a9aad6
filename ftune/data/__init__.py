"""Data: read rows, encode them for the task, hold out an eval split.

    bundle = build_data(dataset_cfg, tokenizer, max_length=512, seed=0)
    bundle.train, bundle.eval      # lists of encoded examples
    bundle.task                    # "seq_cls" or "causal_lm"
    bundle.label_names             # class names in id order (classification)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ftune.config import DatasetConfig
from ftune.data.formats import (
    TASK_OF_FORMAT,
    EncodeStats,
    encode_chat,
    encode_classification,
    encode_instruction,
    encode_text,
    resolve_labels,
)
from ftune.data.loading import looks_local, read_rows
from ftune.errors import FtuneError


@dataclass
class DataBundle:
    task: str
    train: list[dict]
    eval: list[dict]
    label_names: list[str] = field(default_factory=list)
    stats: dict[str, EncodeStats] = field(default_factory=dict)


def task_of(cfg: DatasetConfig) -> str:
    if cfg.format not in TASK_OF_FORMAT:
        raise FtuneError(
            f"Unknown dataset.format '{cfg.format}'; choose one of {', '.join(TASK_OF_FORMAT)}."
        )
    return TASK_OF_FORMAT[cfg.format]


def _eval_rows(cfg: DatasetConfig, train_rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    if cfg.eval_path:
        return train_rows, read_rows(cfg.eval_path, cfg.subset, cfg.split)
    if cfg.eval_split:
        if looks_local(cfg.path):
            raise FtuneError(
                f"dataset.eval_split='{cfg.eval_split}' needs a hub dataset with named splits, but "
                f"'{cfg.path}' is a local file. Use `dataset.eval_path=<file>` or `dataset.eval_fraction=0.1`."
            )
        return train_rows, read_rows(cfg.path, cfg.subset, cfg.eval_split)
    if cfg.eval_fraction:
        if not 0 < cfg.eval_fraction < 1:
            raise FtuneError(f"dataset.eval_fraction must be between 0 and 1 (got {cfg.eval_fraction}).")
        rows = list(train_rows)
        random.Random(seed).shuffle(rows)
        k = max(1, int(len(rows) * cfg.eval_fraction))
        return rows[k:], rows[:k]
    return train_rows, []


def build_data(cfg: DatasetConfig, tokenizer, max_length: int, seed: int = 0,
               chat_template: str | None = None) -> DataBundle:
    """Read, split and encode the dataset that ``cfg`` describes."""
    task = task_of(cfg)
    rows = read_rows(cfg.path, cfg.subset, cfg.split)
    if not rows:
        raise FtuneError(
            f"Dataset '{cfg.path}' (split '{cfg.split}') is empty: there is nothing to train on. "
            f"Check the file or the split name."
        )
    train_rows, eval_rows = _eval_rows(cfg, rows, seed)
    if cfg.max_samples:
        train_rows = train_rows[: cfg.max_samples]
    if cfg.max_eval_samples:
        eval_rows = eval_rows[: cfg.max_eval_samples]

    label_names: list[str] = []

    def encode(part: list[dict], source: str):
        if not part:
            return [], EncodeStats()
        if cfg.format == "classification":
            return encode_classification(part, cfg, tokenizer, max_length, label_names, source)
        if cfg.format == "instruction":
            return encode_instruction(part, cfg, tokenizer, max_length, source)
        if cfg.format == "chat":
            return encode_chat(part, cfg, tokenizer, max_length, source, fallback_template=chat_template)
        return encode_text(part, cfg, tokenizer, max_length, source)

    if cfg.format == "classification":
        from ftune.data.formats import _require_columns

        _require_columns(train_rows, [cfg.text_column, cfg.label_column], "classification", cfg.path)
        label_names = resolve_labels(cfg, train_rows, eval_rows)
    train, train_stats = encode(train_rows, cfg.path)
    evals, eval_stats = encode(eval_rows, cfg.eval_path or cfg.path)
    if not train:
        raise FtuneError(
            f"No training example is left from '{cfg.path}' after encoding ({train_stats.rows} rows: "
            f"{train_stats.dropped_no_target} had no answer token within trainer.max_length={max_length}, "
            f"{train_stats.dropped_empty} were empty). Raise trainer.max_length or shorten the prompts."
        )
    return DataBundle(task, train, evals, label_names, {"train": train_stats, "eval": eval_stats})
