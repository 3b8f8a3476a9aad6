"""Read raw rows from a hub id, a local file (json, jsonl, csv, tsv, parquet, txt) or a directory.

Every reader returns a :class:`Table`: the rows it could read, the line (or row number) each came
from, and every row it could not read as a :class:`BadRow` with the reason, so that nothing is
dropped unseen (``ftune.data.checks`` decides whether bad rows refuse the file or are skipped).
Problems that leave no row readable (undecodable bytes, a broken JSON array, a CSV header with
duplicate names) refuse the file at once.

Text is decoded as its byte-order mark says (UTF-8, UTF-16 or UTF-32; the mark is never part of
the first column's name), else as UTF-8, or as ``dataset.encoding``. CSV/TSV header names are
stripped of surrounding spaces.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ftune.errors import FtuneError

LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt"}
BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]


@dataclass
class BadRow:
    """A row that cannot be used: where it starts (1-based, as an editor shows it), and why."""

    at: int
    reason: str
    end: int | None = None  # the last line, when a record spans several


@dataclass
class Table:
    """The rows of one source, where each came from, and what could not be read."""

    source: str  # the file or hub id, as the user named it
    unit: str = "line"  # what ``at`` counts: "line" (text files), "item" (JSON arrays), "row" (parquet, hub)
    rows: list[dict] = field(default_factory=list)
    at: list[int] = field(default_factory=list)  # where each row starts
    columns: list[str] = field(default_factory=list)  # the header (CSV/TSV/parquet/hub), else all keys seen
    bad: list[BadRow] = field(default_factory=list)
    blank: int = 0  # blank lines (and rows of empty fields): not rows, ignored

    def add(self, row: dict, at: int) -> None:
        self.rows.append(row)
        self.at.append(at)

    def where(self, bad: BadRow) -> str:
        if bad.end and bad.end != bad.at:
            return f"{self.unit}s {bad.at}-{bad.end}"
        return f"{self.unit} {bad.at}"


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_SUFFIXES or Path(path).exists()


def decode(path: Path, encoding: str = "auto") -> str:
    """The text of ``path``: as its byte-order mark says, else UTF-8 (``auto``), or in ``encoding``."""
    raw = path.read_bytes()
    codec = next((c for bom, c in BOMS if raw.startswith(bom)), "utf-8") if encoding == "auto" else encoding
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        line = raw[:e.start].decode(codec, errors="replace").count("\n") + 1
        byte = raw[e.start:e.start + 1].hex()
        if encoding == "auto":
            fix = ("Re-save it as UTF-8 (Excel: 'CSV UTF-8'), or name its encoding, e.g. dataset.encoding=latin-1 "
                   "or dataset.encoding=cp1252 (Windows).")
        else:
            fix = "Set dataset.encoding to the file's real encoding (or auto for UTF-8 and files with a byte-order mark)."
        what = "not UTF-8 text" if codec == "utf-8" else f"not valid {codec} text"
        raise FtuneError(f"Data file '{path}' is {what}: line {line} has the byte 0x{byte} ({e.reason}). {fix}") from None
    text = text.removeprefix("\ufeff")  # an explicit utf-8/utf-16-le given for a file that has a mark
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise FtuneError(
            f"Data file '{path}' holds NUL characters (first on line {line}): it is a binary file, or UTF-16 text "
            f"without a byte-order mark. Set dataset.encoding=utf-16-le (or utf-16-be), or re-save it as UTF-8."
        )
    return text


def _lines(text: str) -> list[str]:
    """Physical lines (\\n, \\r\\n or \\r), not str.splitlines, which also splits at U+2028 inside JSON strings."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # the last line's newline ends it; it starts none


def _kind(value) -> str:
    return {list: "a JSON array", str: "a JSON string", bool: "true/false", type(None): "null"}.get(
        type(value), "a JSON number")


def _read_jsonl(text: str, table: Table) -> None:
    keys: dict[str, None] = {}
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            table.blank += 1
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            reason = f"not valid JSON ({e.msg}, column {e.colno})"
            stripped = line.rstrip()
            if stripped.endswith(","):
                try:
                    json.loads(stripped[:-1])
                    reason = "a comma after the object (JSON Lines has none between lines)"
                except json.JSONDecodeError:
                    pass
            elif stripped in ("{", "[", "}", "]", "},", "],"):
                reason += "; each object must fill one line (a pretty-printed file belongs in a .json array)"
            table.bad.append(BadRow(lineno, reason))
            continue
        if not isinstance(value, dict):
            table.bad.append(BadRow(lineno, f"{_kind(value)}, not an object with named fields"))
            continue
        keys.update(dict.fromkeys(value))
        table.add(value, lineno)
    if table.bad and not table.rows and table.bad[0].at == 1:
        try:  # a single JSON document in a .jsonl file
            whole = json.loads(text)
        except json.JSONDecodeError:
            return
        raise FtuneError(
            f"Data file '{table.source}' holds one JSON document ({_kind(whole) if not isinstance(whole, dict) else 'an object'}), "
            f"not JSON Lines. Save the rows as a JSON array of objects in a .json file, or one object per line."
        )
    table.columns = list(keys)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_json_array(text: str, table: Table) -> None:
    """A JSON array of objects, item by item, so that each item's line is known."""
    decoder, keys = json.JSONDecoder(), {}
    i = _skip_space(text, text.index("[") + 1)
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def broken(pos: int, what: str) -> FtuneError:
        return FtuneError(
            f"Data file '{table.source}' is not valid JSON: {what} at line {line_at(pos)}. Fix that line (a JSON "
            f"array is [{{...}}, {{...}}] with no comma after the last item), or save the rows as JSON Lines."
        )

    item = 0
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise FtuneError(
                    f"Data file '{table.source}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                    f"Fix that line, or save the data as JSON Lines (one object per line)."
                ) from None
            item += 1
            at = line_at(i)
            if isinstance(value, dict):
                keys.update(dict.fromkeys(value))
                table.add(value, at)
            else:
                table.bad.append(BadRow(at, f"{_kind(value)}, not an object with named fields"))
            i = _skip_space(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_space(text, i + 1)
                if i < len(text) and text[i] == "]":
                    raise broken(i, "a comma after the last item")
                continue
            if i < len(text) and text[i] == "]":
                i += 1
                break
            raise broken(i, "',' or ']' expected after an item")
    if _skip_space(text, i) < len(text):
        raise broken(_skip_space(text, i), "text after the closing ']'")
    table.columns = list(keys)


def _read_csv(text: str, table: Table, delimiter: str | None, tsv: bool) -> None:
    first = text.split("\n", 1)[0].rstrip("\r")
    excel_sep = first[4:] if first.lower().startswith("sep=") and len(first) == 5 else None  # Excel's "sep=;" line
    if excel_sep:
        delimiter = delimiter or excel_sep
    sep = delimiter or ("\t" if tsv else ",")
    # TSV files in the wild (GLUE) carry literal quotes: read them as text, not quoting. For CSV, strict
    # quoting turns an unclosed quote (which would swallow the lines after it) into an error on that row.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    names: list[str] | None = None
    last = 0  # reader.line_num after the previous record
    while True:
        start = last + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            last = reader.line_num
            if names is None:
                raise FtuneError(f"Could not read the header of '{table.source}' (line {start}): {e}.") from None
            table.bad.append(BadRow(start, _quote_reason(str(e), start, last), last))
            continue
        last = reader.line_num
        if excel_sep and start == 1:
            continue
        if not any(f.strip() for f in record):  # a blank line, or a spreadsheet row of empty cells
            table.blank += 1
            continue
        if names is None:
            names = _header(record, table, sep, explicit=delimiter is not None)
            continue
        if len(record) != len(names):
            hint = (f"a '{sep}' inside a field that is not quoted?" if len(record) > len(names)
                    else "a missing field or a line break inside a field?")
            table.bad.append(BadRow(start, f"{len(record)} fields where the header has {len(names)} ({hint})", last))
            continue
        row = {}
        for name, value in zip(names, record, strict=True):
            if name:
                row[name] = value
            elif value.strip():
                row = None
                break
        if row is None:
            table.bad.append(BadRow(start, "a value under a column with no name in the header "
                                           f"(a '{sep}' inside a field that is not quoted?)", last))
            continue
        table.add(row, start)
    table.columns = [n for n in names or [] if n]


def _quote_reason(error: str, start: int, end: int) -> str:
    if "unexpected end of data" in error:
        return (f"a quote opened on line {start} is never closed, so every line after it ran into one field "
                f"(close the quote, or write a quote inside a quoted field as \"\")")
    if "expected after" in error:
        return (f"an unclosed quote ran lines {start}-{end} together (a quoted field must end at the delimiter; "
                f"write a quote inside a quoted field as \"\")")
    if "field larger than field limit" in error:
        return f"a field longer than {csv.field_size_limit():,} characters, most likely an unclosed quote"
    return error


def _header(record: list[str], table: Table, sep: str, explicit: bool) -> list[str]:
    names = [n.strip() for n in record]
    if not explicit and len(names) == 1:
        other = next((c for c in ";\t|" if c in names[0]), None)
        if other:
            shown = "\\t" if other == "\t" else other
            raise FtuneError(
                f"The header of '{table.source}' came out as one column '{names[0]}', which holds '{shown}': the "
                f"file is separated by '{shown}', not '{sep}' (as Excel saves CSV in many European locales). "
                f"Set dataset.delimiter='{shown}'."
            )
    seen = [n for n in names if n]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise FtuneError(
            f"The header of '{table.source}' names column{'s' if len(dupes) > 1 else ''} "
            f"{', '.join(repr(d) for d in dupes)} more than once (columns: {names}), so ftune cannot tell which "
            f"one you mean. Rename the duplicates in the header."
        )
    return names


def _read_parquet(path: Path, table: Table) -> None:
    import pyarrow.parquet as pq

    data = pq.read_table(path)
    table.unit, table.columns = "row", list(data.column_names)
    for i, row in enumerate(data.to_pylist(), start=1):
        table.add(row, i)


def _read_txt(text: str, table: Table) -> None:
    table.columns = ["text"]
    for lineno, line in enumerate(_lines(text), start=1):
        if line.strip():
            table.add({"text": line}, lineno)
        else:
            table.blank += 1


def read_local(path_str: str, encoding: str = "auto", delimiter: str | None = None) -> Table:
    """The rows of a local file; the format is chosen by the file extension."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise FtuneError(
            f"Data file '{path_str}' does not exist. Set `dataset.path=` to an existing json, jsonl, csv, tsv, "
            f"parquet or txt file, or to a Hugging Face hub dataset id."
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        train = [p for p in files if p.stem.startswith("train")]
        if not train:
            raise FtuneError(
                f"Data directory '{path_str}' has no train.* file (found: {[p.name for p in files]}). "
                f"Point `dataset.path=` at the file itself."
            )
        path = train[0]
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise FtuneError(
            f"Data file '{path}' has an unsupported extension '{suffix}'; use one of "
            f"{', '.join(sorted(LOCAL_SUFFIXES))}."
        )
    table = Table(str(path))
    try:
        if suffix == ".parquet":
            _read_parquet(path, table)
            return table
        text = decode(path, encoding)
        if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith("[")):
            _read_jsonl(text, table)
        elif suffix == ".json":
            _read_json_array(text, table)
        elif suffix in (".csv", ".tsv"):
            from ftune.config import delimiter_char

            sep = delimiter_char(delimiter) if delimiter else None
            if sep is not None and len(sep) != 1:
                raise FtuneError(f"dataset.delimiter must be one character, e.g. ';' or '\\t' (got '{delimiter}').")
            _read_csv(text, table, sep, suffix == ".tsv")
        else:
            _read_txt(text, table)
    except LookupError:
        raise FtuneError(f"dataset.encoding '{encoding}' is not an encoding Python knows; use auto, utf-8, "
                         f"utf-16, latin-1, cp1252, ...") from None
    except (OSError, ValueError) as e:
        raise FtuneError(
            f"Could not read data file '{path}': {str(e).rstrip('.')}. Check that the file is not corrupt."
        ) from None
    return table


def read_hub(path: str, subset: str | None, split: str) -> Table:
    """Rows of one split of a Hugging Face hub dataset (downloaded or from the local cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise FtuneError(
                f"Dataset '{path}' has no split '{split}': {e}. Set `dataset.split=`/`dataset.eval_split=` to "
                f"one of its splits, or use `dataset.eval_fraction=0.05` to hold out part of the training data."
            ) from None
        raise FtuneError(f"Could not load dataset '{path}': {e}") from None
    except Exception as e:  # hub errors come in many classes (connection, not found, gated)
        raise FtuneError(
            f"Could not load dataset '{path}' from the Hugging Face hub: {type(e).__name__}: {e}. Check the id "
            f"and your network, or point `dataset.path=` at a local json/jsonl/csv/tsv/parquet file."
        ) from None
    table = Table(f"{path} (split {split})", unit="row", columns=list(ds.column_names))
    for i, row in enumerate(ds.to_list(), start=1):
        table.add(row, i)
    return table


def read_rows(path: str, subset: str | None = None, split: str = "train", encoding: str = "auto",
              delimiter: str | None = None) -> Table:
    return read_local(path, encoding, delimiter) if looks_local(path) else read_hub(path, subset, split)


def is_missing(value) -> bool:
    """None, or a float NaN (how pandas and parquet exports write an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
