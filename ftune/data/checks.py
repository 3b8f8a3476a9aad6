"""Which rows a dataset format can use, and what happens to the others.

A row is bad when the reader could not read it (``Table.bad``) or when a field the format needs is
missing, null/NaN, empty or of the wrong kind; for classification also when its label is not one
of the classes. ``dataset.bad_rows=error`` (the default) refuses the file naming the first bad
row's line and why; ``dataset.bad_rows=skip`` trains without them and :class:`DataReport` states
how many were skipped in the run header and in metrics.json. Blank lines (and, for the text format,
rows of empty text) are not rows: they are ignored and counted apart.

Labels are normalised here: surrounding spaces are stripped, and ``1``, ``1.0``, ``"1"`` and
``" 1 "`` are one class (pandas writes integer columns with an empty cell as floats).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ftune.config import DatasetConfig
from ftune.data.loading import BadRow, Table, is_missing
from ftune.errors import FtuneError

INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
SHOWN = 3  # bad rows named in a message or the run header besides the first


def normalize_label(value: Any) -> tuple[Any, str | None]:
    """(label, None) with the label an int or a stripped non-empty string, or (None, why not)."""
    if is_missing(value):
        return None, "the label is missing (null/NaN)"
    if isinstance(value, bool):
        return str(value).lower(), None
    if isinstance(value, int):
        return value, None
    if isinstance(value, float):
        return (int(value) if value.is_integer() else str(value)), None
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None, "the label is empty"
        return (int(s.split(".")[0]) if INTEGER.fullmatch(s) else s), None
    return None, f"the label is {_kind(value)}, not a single value"


def label_id(label: Any, names: list[str], by_index: bool) -> int | None:
    """The class id of a normalised label: by name, or (``by_index``: names given in the config) an int id."""
    try:
        return names.index(str(label))
    except ValueError:
        pass
    if by_index and isinstance(label, int) and 0 <= label < len(names):
        return label
    return None


def _kind(value: Any) -> str:
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _text_problem(value: Any, column: str) -> str | None:
    if is_missing(value):
        return f"'{column}' is missing (null/NaN)"
    if isinstance(value, (list, dict)):
        return f"'{column}' is {_kind(value)}, not text"
    if isinstance(value, str) and not value.strip():
        return f"'{column}' is empty" + (" (only spaces)" if value else "")
    return None


def _messages(value: Any) -> tuple[list | None, str | None]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # a list saved as JSON text (CSV, spreadsheets)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "the messages are text that is not a valid JSON list"
    if not isinstance(value, list) or not value:
        return None, "the messages are not a non-empty list of {role, content}"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in value):
        return None, "a message is not {role, content} with text content"
    if not any(m["role"] == "assistant" for m in value):
        return None, "no assistant message (nothing to learn)"
    return value, None


def required_columns(cfg: DatasetConfig) -> list[str]:
    if cfg.format == "classification":
        return [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    if cfg.format == "instruction":
        return [cfg.instruction_column, cfg.output_column]
    if cfg.format == "chat":
        return [cfg.messages_column]
    return [cfg.text_column]


def require_columns(found: list[str], columns: list[str], what: str, source: str) -> None:
    """Refuse a source that lacks a needed column in every row, naming the columns it has."""
    missing = [c for c in columns if c not in found]
    if missing:
        spare = [c for c in found if c not in columns] or found  # suggest columns not already in use
        keys = {"text": "text_column", "label": "label_column", "instruction": "instruction_column",
                "output": "output_column", "messages": "messages_column", "input": "input_column"}
        hint = " ".join(f"dataset.{keys.get(m, 'text_column')}={c}" for m, c in zip(missing, spare, strict=False))
        raise FtuneError(
            f"The {what} data in '{source}' has no column {', '.join(repr(c) for c in missing)}; the columns found "
            f"are {found}. Map yours with dataset.<x>_column=<name>, e.g. `{hint}`."
        )


def check_rows(table: Table, cfg: DatasetConfig, label_names: list[str] | None = None) -> None:
    """Move every row the format cannot use to ``table.bad`` (with the reason); normalise labels and
    optional fields in place. ``label_names``: the classes a label must be one of (None: any)."""
    needed = required_columns(cfg)
    if table.columns:
        require_columns(table.columns, needed, cfg.format, table.source)
    optional = [c for c in (cfg.input_column, cfg.system_column) if c] if cfg.format == "instruction" else []
    rows, at = [], []
    for row, where in zip(table.rows, table.at, strict=True):
        problem = None
        absent = [c for c in needed if c not in row]
        if absent:
            problem = f"no field {', '.join(repr(c) for c in absent)}"
        elif cfg.format in ("text", "masked_text"):
            problem = _text_problem(row[cfg.text_column], cfg.text_column)
            if problem and "empty" in problem:  # an empty paragraph: like a blank line, not a bad row
                table.blank += 1
                continue
        elif cfg.format == "chat":
            row[cfg.messages_column], problem = _messages(row[cfg.messages_column])
        else:
            texts = [c for c in needed if c != cfg.label_column or cfg.format != "classification"]
            problem = next((p for c in texts if (p := _text_problem(row[c], c))), None)
            if problem is None and cfg.format == "classification":
                row[cfg.label_column], problem = normalize_label(row[cfg.label_column])
                if problem is None and label_names is not None and \
                        label_id(row[cfg.label_column], label_names, bool(cfg.label_names)) is None:
                    problem = (f"its label {row[cfg.label_column]!r} is not one of the classes {label_names}"
                               + ("" if cfg.label_names else " of the training data")
                               + "; list every class in dataset.label_names to allow it")
        if problem:
            table.bad.append(BadRow(where, problem))
            continue
        for c in optional:
            if is_missing(row.get(c)):
                row[c] = None
        rows.append(row)
        at.append(where)
    table.rows, table.at = rows, at
    table.bad.sort(key=lambda b: b.at)


@dataclass
class Skipped:
    source: str
    count: int = 0
    shown: list[str] = field(default_factory=list)  # "line 4 (the label is empty)" for the first few
    blank: int = 0


def settle(table: Table, bad_rows: str) -> Skipped:
    """Refuse ``table`` if it has bad rows (``bad_rows=error``), else account for the ones left out."""
    bad = table.bad
    shown = [f"{table.where(b)} ({b.reason})" for b in bad[: SHOWN + 1]]
    if bad and bad_rows != "skip":
        first = bad[0]
        more = f"; also {', '.join(shown[1:])}" + (f" and {len(bad) - len(shown)} more" if len(bad) > len(shown) else "")
        raise FtuneError(
            f"The data in '{table.source}' has {len(bad)} bad row{'s' if len(bad) > 1 else ''}: "
            f"{table.where(first)}: {first.reason}{more if len(bad) > 1 else ''}. "
            + (f"Fix or remove {table.where(first)}" if len(bad) == 1 else "Fix or remove those rows")
            + ", or set dataset.bad_rows=skip to train without them (the run header and metrics.json then say "
            "how many were skipped)."
        )
    return Skipped(table.source, len(bad), shown, table.blank)


@dataclass
class DataReport:
    """What was left out of the data, for the run header and metrics.json."""

    bad_rows: str = "error"
    parts: dict[str, Skipped] = field(default_factory=dict)  # "train", and "eval" for a separate eval source

    def header_lines(self) -> list[str]:
        lines = []
        for s in self.parts.values():
            if s.count:
                lines.append(f"skipped {s.count} bad row{'s' if s.count > 1 else ''} of {s.source} "
                             f"(dataset.bad_rows=skip): {', '.join(s.shown)}"
                             + (" ..." if s.count > len(s.shown) else ""))
            if s.blank:
                lines.append(f"ignored {s.blank} blank line{'s' if s.blank > 1 else ''} (or empty rows) in {s.source}")
        return lines

    def metrics(self) -> dict[str, int]:
        if self.bad_rows != "skip":
            return {}  # with bad_rows=error there are none: the data was refused otherwise
        out = {"data/skipped_rows": sum(s.count for s in self.parts.values())}
        if len(self.parts) > 1:
            out.update({f"data/skipped_rows_{name}": s.count for name, s in self.parts.items()})
        return out
