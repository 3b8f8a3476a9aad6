"""Data: read rows, encode them for the task, hold out an eval split.

    bundle = build_data(dataset_cfg, tokenizer, max_length=512, seed=0)
    bundle.train, bundle.eval      # lists of encoded examples
    bundle.task                    # "seq_cls", "causal_lm" or "masked_lm"
    bundle.label_names             # class names in id order (classification)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ftune.config import DatasetConfig
from ftune.data.checks import DataReport, check_rows, settle
from ftune.data.formats import (
    TASK_OF_FORMAT,
    EncodeStats,
    encode_chat,
    encode_classification,
    encode_instruction,
    encode_masked_text,
    encode_text,
    resolve_labels,
)
from ftune.data.loading import Table, looks_local, read_rows
from ftune.errors import FtuneError


@dataclass
class DataBundle:
    task: str
    train: list[dict]
    eval: list[dict]
    label_names: list[str] = field(default_factory=list)
    stats: dict[str, EncodeStats] = field(default_factory=dict)
    report: DataReport = field(default_factory=DataReport)  # bad rows skipped, blank lines ignored


def task_of(cfg: DatasetConfig) -> str:
    if cfg.format not in TASK_OF_FORMAT:
        raise FtuneError(
            f"Unknown dataset.format '{cfg.format}'; choose one of {', '.join(TASK_OF_FORMAT)}."
        )
    return TASK_OF_FORMAT[cfg.format]


def _read(cfg: DatasetConfig, path: str, split: str) -> Table:
    return read_rows(path, cfg.subset, split, cfg.encoding, cfg.delimiter)


def _eval_table(cfg: DatasetConfig) -> Table | None:
    """The eval data when it is a source of its own (a file or a hub split), else None."""
    if cfg.eval_path:
        return _read(cfg, cfg.eval_path, cfg.split)
    if cfg.eval_split:
        if looks_local(cfg.path):
            raise FtuneError(
                f"dataset.eval_split='{cfg.eval_split}' needs a hub dataset with named splits, but "
                f"'{cfg.path}' is a local file. Use `dataset.eval_path=<file>` or `dataset.eval_fraction=0.1`."
            )
        return _read(cfg, cfg.path, cfg.eval_split)
    return None


def _no_rows(table: Table, what: str) -> FtuneError:
    if table.bad:
        return FtuneError(f"Every row of '{table.source}' is bad ({len(table.bad)} skipped with "
                          f"dataset.bad_rows=skip, e.g. {table.where(table.bad[0])}: {table.bad[0].reason}): there is "
                          f"{what}. Fix the file.")
    if table.columns and table.source.lower().endswith((".csv", ".tsv")):
        return FtuneError(f"Data file '{table.source}' has a header ({', '.join(table.columns)}) but no rows: "
                          f"there is {what}. Check that the rows were saved.")
    return FtuneError(f"Dataset '{table.source}' is empty: there is {what}. Check the file or the split name.")


def build_data(cfg: DatasetConfig, tokenizer, max_length: int, seed: int = 0,
               chat_template: str | None = None) -> DataBundle:
    """Read, check, split and encode the dataset that ``cfg`` describes.

    Every row the format cannot use refuses the data (``dataset.bad_rows=error``) or is skipped and
    counted in ``bundle.report`` (``skip``); see ``ftune.data.checks``.
    """
    task = task_of(cfg)
    report = DataReport(cfg.bad_rows)
    table = _read(cfg, cfg.path, cfg.split)
    eval_table = _eval_table(cfg)
    configured = [str(n).strip() for n in cfg.label_names] if cfg.label_names else None
    check_rows(table, cfg, configured)
    report.parts["train"] = settle(table, cfg.bad_rows)
    if not table.rows:
        raise _no_rows(table, "nothing to train on")
    label_names = resolve_labels(cfg, table.rows) if cfg.format == "classification" else []
    train_rows, eval_rows = table.rows, []
    if eval_table is not None:
        check_rows(eval_table, cfg, label_names or None)
        report.parts["eval"] = settle(eval_table, cfg.bad_rows)
        if not eval_table.rows:
            raise _no_rows(eval_table, "nothing to evaluate on")
        eval_rows = eval_table.rows
    elif cfg.eval_fraction:
        if not 0 < cfg.eval_fraction < 1:
            raise FtuneError(f"dataset.eval_fraction must be between 0 and 1 (got {cfg.eval_fraction}).")
        rows = list(train_rows)
        random.Random(seed).shuffle(rows)
        k = max(1, int(len(rows) * cfg.eval_fraction))
        train_rows, eval_rows = rows[k:], rows[:k]
    if cfg.max_samples:
        train_rows = train_rows[: cfg.max_samples]
    if cfg.max_eval_samples:
        eval_rows = eval_rows[: cfg.max_eval_samples]

    def encode(part: list[dict], source: str):
        if not part:
            return [], EncodeStats()
        if cfg.format == "classification":
            return encode_classification(part, cfg, tokenizer, max_length, label_names, source)
        if cfg.format == "instruction":
            return encode_instruction(part, cfg, tokenizer, max_length, source)
        if cfg.format == "chat":
            return encode_chat(part, cfg, tokenizer, max_length, source, fallback_template=chat_template)
        if cfg.format == "masked_text":
            return encode_masked_text(part, cfg, tokenizer, max_length, source)
        return encode_text(part, cfg, tokenizer, max_length, source)

    train, train_stats = encode(train_rows, cfg.path)
    evals, eval_stats = encode(eval_rows, cfg.eval_path or cfg.path)
    if not train:
        raise FtuneError(
            f"No training example is left from '{cfg.path}' after encoding ({train_stats.rows} rows: "
            f"{train_stats.dropped_no_target} had no answer token within trainer.max_length={max_length}, "
            f"{train_stats.dropped_empty} were empty). Raise trainer.max_length or shorten the prompts."
        )
    return DataBundle(task, train, evals, label_names, {"train": train_stats, "eval": eval_stats}, report)
