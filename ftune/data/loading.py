"""Read raw rows from a hub id, a local file (json, jsonl, csv, tsv, parquet, txt) or a directory."""

from __future__ import annotations

import json
from pathlib import Path

from ftune.errors import FtuneError

LOCAL_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt"}


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_SUFFIXES or Path(path).exists()


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise FtuneError(
                f"Data file '{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                f"Fix that line, or save the data as JSON Lines (one object per line)."
            ) from None
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FtuneError(
                f"Data file '{path}' has a bad JSON line: line {lineno}: {e.msg} (column {e.colno}). "
                f"Each line of a .jsonl file must be one JSON object; fix or remove line {lineno}."
            ) from None
    if rows and not all(isinstance(r, dict) for r in rows):
        raise FtuneError(f"Data file '{path}' must hold JSON objects (one per line or a list of them).")
    return rows


def read_local(path_str: str) -> list[dict]:
    """Rows (dicts) from a local file; the format is chosen by the file extension."""
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
    try:
        if suffix in (".json", ".jsonl"):
            return _read_json(path)
        if suffix in (".csv", ".tsv"):
            import csv

            with path.open(encoding="utf-8", newline="") as f:
                delimiter = "\t" if suffix == ".tsv" else ","
                # TSV files in the wild (GLUE) carry literal quotes: read them as text, not quoting.
                quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
                return list(csv.DictReader(f, delimiter=delimiter, quoting=quoting))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".txt":
            return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise FtuneError(
            f"Data file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8."
        ) from None
    except (OSError, ValueError) as e:
        raise FtuneError(
            f"Could not read data file '{path}': {str(e).rstrip('.')}. Check that the file is not corrupt."
        ) from None
    raise FtuneError(
        f"Data file '{path}' has an unsupported extension '{suffix}'; use one of "
        f"{', '.join(sorted(LOCAL_SUFFIXES))}."
    )


def read_hub(path: str, subset: str | None, split: str) -> list[dict]:
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
    return ds.to_list()


def read_rows(path: str, subset: str | None = None, split: str = "train") -> list[dict]:
    return read_local(path) if looks_local(path) else read_hub(path, subset, split)
