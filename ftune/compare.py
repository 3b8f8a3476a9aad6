"""`ftune compare`: one table across runs, a CSV and a metric-vs-trainable-parameters plot.

    ftune compare runs/sweep                     every run under a multirun sweep directory
    ftune compare runs/a runs/b runs/base        a list of runs (and `ftune eval ... out=` baselines)
    ftune compare runs/sweep out=reports/x metric=eval/loss

A run is a directory holding ``config.yaml`` (or ``error.txt``: a sweep job that failed before
it wrote its config). Metrics come from ``metrics.json`` (written by ``ftune train``) updated by
``eval.json`` (written by ``ftune eval``, which wins where both have a key). Runs without metrics
are listed as failed, with the first line of their ``error.txt``.

Columns: run, method, every hyperparameter that differs between the runs (when the model or dataset
differs, only its name), trainable %, the metric (strategy=continual runs: also their backward transfer
and forgetting; multi-task runs: each task's accuracy and the macro average), the lm-evaluation-harness metrics
any run has (``harness/<task>/<metric>``, from ``ftune eval harness.tasks=...``), train time, tokens/s and peak
memory. Written to
``comparison.md``, ``comparison.csv`` and ``comparison.png`` in the sweep directory, or in ``out=``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune.errors import FtuneError

SKIP_DIRS = {"adapter", "tokenizer", "checkpoints", "stages", ".submitit", ".hydra", "__pycache__"}  # stages: a run's own
# keys that differ between runs without being hyperparameters
IGNORED_KEYS = ("output_dir", "overwrite", "resume", "verbose", "trainer.progress", "hydra", "evaluated_run")
# groups that are shown by name only when they differ in name (a model swap changes every model.config.* key)
NAMED_GROUPS = {"model": "model.name", "dataset": "dataset.name", "optimizer": "optimizer._target_",
                "scheduler": "scheduler._target_"}
METRIC_PREFERENCE = ("continual/average_accuracy", "eval/macro_accuracy", "eval/accuracy", "eval/exact_match",
                     "eval/gsm8k", "eval/macro_f1", "eval/loss")
LOWER_IS_BETTER = ("loss", "perplexity", "forgetting")
# strategy=continual's summary of the accuracy matrix: columns of their own when a run has them
CONTINUAL_COLUMNS = ("continual/average_accuracy", "continual/backward_transfer", "continual/forgetting")


@dataclass
class RunRow:
    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)  # flattened
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def method(self) -> str:
        return str(self.config.get("method.name", "?"))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(node, list):
        return {key: json.dumps(node)}
    return {key: node}


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "error.txt").is_file() or (path / "metrics.json").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories named in ``paths``, or found below them (a sweep directory), sorted."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FtuneError(f"'{p}' does not exist; pass run directories or a sweep directory that holds runs.")
        if not p.is_dir():
            raise FtuneError(f"'{p}' is a file; pass run directories or a sweep directory that holds runs.")
        if is_run_dir(p):
            found.append(p)
            continue
        below = []
        for root, dirs, _ in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            r = Path(root)
            if r != p and is_run_dir(r):
                below.append(r)
                dirs[:] = []  # a run's own sub-folders hold no runs
        if not below:
            raise FtuneError(
                f"'{p}' holds no ftune runs (no sub-directory with config.yaml). Pass the output_dir of "
                f"`ftune train -m ...` or run directories."
            )
        found.extend(below)
    unique = list(dict.fromkeys(x.resolve() for x in found))
    return [Path(x) for x in unique]


def _natural_key(s: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def load_row(path: Path, base: Path | None) -> RunRow:
    from omegaconf import OmegaConf

    try:
        name = str(path.relative_to(base)) if base is not None and path != base else path.name
    except ValueError:
        name = path.name
    row = RunRow(path=path, name=name or path.name)
    if (path / "config.yaml").exists():
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
            tasks = (raw.get("strategy") or {}).get("tasks") if isinstance(raw.get("strategy"), dict) else None
            if isinstance(tasks, list):  # multitask: the tasks by name (their settings would fill a column)
                raw["strategy"]["tasks"] = "+".join(str(t.get("name")) for t in tasks if isinstance(t, dict))
            row.config = flatten(raw)
        except Exception as e:  # a broken file must not hide the other runs
            row.error = f"unreadable config.yaml: {e}"
    if (path / "metrics.json").exists():
        row.metrics.update(json.loads((path / "metrics.json").read_text()))
    if (path / "eval.json").exists():
        ev = json.loads((path / "eval.json").read_text())
        row.metrics.update({k: v for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if row.error is None and (path / "error.txt").exists():
        text = (path / "error.txt").read_text().strip()
        row.error = text.splitlines()[0] if text else "failed (empty error.txt)"
    elif row.error is None and not any(k.startswith(("eval/", "harness/")) for k in row.metrics):
        row.error = "no metrics.json: the run did not finish (interrupted, or still running)"
    if "method.name" not in row.config and "_" in path.name:  # a failed sweep job: name it by its directory
        row.config.setdefault("method.name", path.name.split("_", 1)[1])
    return row


def differing_keys(rows: list[RunRow]) -> list[str]:
    """Config keys whose values are not the same in every run that has a config."""
    # base-model evals (`ftune eval model=... out=`) have no trainer/optimizer: they do not decide the columns
    with_cfg = [r for r in rows if r.config and len(r.config) > 1 and r.method != "base"]
    if len(with_cfg) < 2:
        return []
    keys = sorted(set().union(*(r.config for r in with_cfg)))
    diff = []
    for k in keys:
        if k == "method.name" or k.startswith(IGNORED_KEYS):
            continue
        # among the runs that have the key: a setting only some methods have (lora's dropout in a sweep
        # over lora and full) is not a varied hyperparameter unless its value changes
        values = {json.dumps(r.config[k], sort_keys=True, default=str) for r in with_cfg if k in r.config}
        if len(values) > 1:
            diff.append(k)
    for group, name_key in NAMED_GROUPS.items():
        if name_key in diff:  # a different model/dataset: its name says it all
            diff = [k for k in diff if k == name_key or not k.startswith(group + ".")]
    return diff


def choose_metric(rows: list[RunRow], metric: str | None) -> str:
    if metric:
        if not metric.startswith("eval/") and not any(metric in r.metrics for r in rows):
            metric = f"eval/{metric}"
        return metric
    for key in METRIC_PREFERENCE:
        if any(key in r.metrics for r in rows):
            return key
    return "eval/loss"


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v) or v == 0:
            return "nan" if math.isnan(v) else "0"
        if abs(v) < 1e-3 or abs(v) >= 1e7:
            return f"{v:.3g}"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)


def task_columns(rows: list[RunRow], metric: str) -> list[str]:
    """Multi-task runs' per-task metrics (``eval/<task>/accuracy``, else ``eval/<task>/loss``) and the macro
    accuracy, beside the chosen metric."""
    per_task = {k for r in rows for k in r.metrics if k.startswith("eval/") and k.count("/") == 2}
    keys = sorted(k for k in per_task if k.endswith("/accuracy")) or sorted(k for k in per_task if k.endswith("/loss"))
    if keys and any("eval/macro_accuracy" in r.metrics for r in rows):
        keys.append("eval/macro_accuracy")
    return [k for k in keys if k != metric]


def harness_keys(rows: list[RunRow], metric: str) -> list[str]:
    """The lm-evaluation-harness metrics (``harness/<task>/<metric>``, from `ftune eval harness.tasks=...`) of any run."""
    return sorted({k for r in rows for k in r.metrics if k.startswith("harness/") and k != metric})


def build_table(rows: list[RunRow], metric: str) -> tuple[list[str], list[list[Any]]]:
    keys = differing_keys(rows)
    extra = [k for k in CONTINUAL_COLUMNS if k != metric and any(k in r.metrics for r in rows)]
    tasks = task_columns(rows, metric)
    harness = harness_keys(rows, metric)
    header = ["run", "method", *keys, "trainable %", metric, *extra, *tasks, *harness, "train time (s)", "tokens/s",
              "peak memory (MB)", "status"]
    body = []
    for r in rows:
        m = r.metrics
        body.append([
            r.name, r.method, *[r.config.get(k) for k in keys], m.get("trainable_percent"), m.get(metric),
            *[m.get(k) for k in extra], *[m.get(k) for k in tasks], *[m.get(k) for k in harness],
            m.get("train_runtime_s"), m.get("tokens_per_s"), m.get("peak_memory_mb"),
            "failed" if r.failed else "ok",
        ])
    return header, body


def best_index(rows: list[RunRow], metric: str) -> int | None:
    scored = [(i, r.metrics[metric]) for i, r in enumerate(rows)
              if not r.failed and isinstance(r.metrics.get(metric), (int, float)) and not math.isnan(r.metrics[metric])]
    if not scored:
        return None
    lower = any(w in metric for w in LOWER_IS_BETTER)
    return (min if lower else max)(scored, key=lambda t: t[1])[0]


def write_markdown(path: Path, header: list[str], body: list[list[Any]], rows: list[RunRow], metric: str,
                   best: int | None) -> None:
    def esc(x: Any) -> str:
        return _fmt(x).replace("|", "\\|")

    lines = [f"# Comparison of {len(rows)} runs", "",
             f"Metric: `{metric}` ({'lower' if any(w in metric for w in LOWER_IS_BETTER) else 'higher'} is better"
             f"{'; best marked with *' if best is not None else ''}).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(body):
        cells = [esc(x) for x in row]
        if i == best:
            cells[0] = f"**{cells[0]}** *"
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.failed]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r.name}` ({r.method}): {r.error}" for r in failed]
    lines += ["", "![metric vs trainable parameters](comparison.png)", ""]
    path.write_text("\n".join(lines))


def write_csv(path: Path, header: list[str], body: list[list[Any]], rows: list[RunRow]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ["error", "trainable_params", "total_params", "path"])
        for row, r in zip(body, rows, strict=True):
            w.writerow(["" if v is None else v for v in row]
                       + [r.error or "", r.metrics.get("trainable_params", ""), r.metrics.get("total_params", ""),
                          str(r.path)])


def plot(path: Path, rows: list[RunRow], metric: str) -> None:
    """comparison.png: the metric against trainable parameters (log x), one labelled point per run.

    Runs with no trainable parameters (base-model evals) are drawn as dashed horizontal lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    points = [(r.metrics.get("trainable_params"), r.metrics.get(metric), r) for r in rows if not r.failed]
    points = [(x, y, r) for x, y, r in points if isinstance(y, (int, float)) and not math.isnan(y)]
    shown = [(x, y, r) for x, y, r in points if isinstance(x, (int, float)) and x > 0]
    methods = sorted({r.method for _, _, r in shown})
    # one colour and marker pair per method: tab10's colours for up to 10 methods, tab20's beyond,
    # and a new marker shape every 20, so no two methods of a sweep look alike
    palette, size = (plt.cm.tab10, 10) if len(methods) <= 10 else (plt.cm.tab20, 20)
    for i, m in enumerate(methods):
        xs = [x for x, _, r in shown if r.method == m]
        ys = [y for _, y, r in shown if r.method == m]
        ax.scatter(xs, ys, s=48, color=palette(i % size), marker="os^Dv"[(i // size) % 5], label=m, zorder=3)
    stacked: dict[tuple[float, float], int] = {}
    for x, y, r in shown:  # runs on the same point get their labels stacked, not overprinted
        spot = (round(math.log10(x), 2), round(float(y), 4))
        k = stacked[spot] = stacked.get(spot, -1) + 1
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(5, 4 + 9 * k), fontsize=7)
    for x, y, r in points:
        if not (isinstance(x, (int, float)) and x > 0):
            ax.axhline(y, linestyle="--", color="gray", linewidth=1, zorder=1)
            ax.annotate(f"{r.name} ({r.method})", (0.01, y), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=7, color="gray")
    if shown:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)  # room for the labels at the edges
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(metric)
    failed = sum(r.failed for r in rows)
    ax.set_title(f"{metric} vs trainable parameters · {len(points)} runs" + (f" ({failed} failed)" if failed else ""),
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if methods:  # beside the axes, where it covers no point
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(header: list[str], body: list[list[Any]], best: int | None, title: str) -> None:
    from rich.table import Table

    from ftune.progress import console

    table = Table(title=title, header_style="bold")
    for h in header:
        table.add_column(h, justify="left" if h in ("run", "method", "status") else "right")
    for i, row in enumerate(body):
        style = "bold green" if i == best else ("red" if row[-1] == "failed" else None)
        table.add_row(*[_fmt(x) for x in row], style=style)
    console.print(table)


def collect_rows(paths: list[str | Path], metric: str | None, command: str = "compare"
                 ) -> tuple[list[RunRow], Path, str]:
    """(the runs in ``paths`` sorted by name, the folder they are named relative to, the metric to rank by)."""
    if not paths:
        raise FtuneError(f"Pass a sweep directory or run directories: `ftune {command} runs/sweep` "
                         f"(see `ftune {command} --help`).")
    paths = [Path(str(p)).expanduser() for p in paths]
    run_dirs = find_runs(paths)
    if len(paths) == 1 and not is_run_dir(paths[0]):
        base = paths[0].resolve()
    else:
        base = Path(os.path.commonpath([str(p) for p in run_dirs])) if len(run_dirs) > 1 else run_dirs[0].parent
    rows = sorted((load_row(p, base) for p in run_dirs), key=lambda r: _natural_key(r.name))
    return rows, base, choose_metric(rows, metric)


def compare(paths: list[str | Path], out: str | Path | None = None, metric: str | None = None) -> dict[str, Any]:
    """Compare the runs in ``paths``; write comparison.md/.csv/.png; returns the table and file paths."""
    from ftune.progress import console

    rows, base, metric = collect_rows(paths, metric)
    header, body = build_table(rows, metric)
    best = best_index(rows, metric)
    out_dir = Path(str(out)).expanduser() if out else base
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FtuneError(f"Cannot write the comparison to '{out_dir}': {e.strerror}; pass out=<a writable dir>.") from None
    files = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv", "png": out_dir / "comparison.png"}
    print_table(header, body, best, f"ftune compare · {base} · {metric}")
    write_markdown(files["md"], header, body, rows, metric, best)
    write_csv(files["csv"], header, body, rows)
    plot(files["png"], rows, metric)
    failed = [r for r in rows if r.failed]
    if failed:
        console.print(f"[red]{len(failed)} failed[/]: " + ", ".join(f"{r.name} ({r.error})" for r in failed), soft_wrap=True)
    console.print(f"[bold green]wrote[/] {files['md']}, {files['csv']}, {files['png']}")
    return {"header": header, "rows": body, "metric": metric, "best": best, "files": files,
            "runs": [r.path for r in rows]}


USAGE = "ftune compare PATH [PATH ...] [out=DIR] [metric=KEY]"
DESCRIPTION = """Compare runs: PATH is a run directory (holding config.yaml) or a directory of runs such as the
output_dir of `ftune train -m ...`. Prints a table (method, the hyperparameters that differ, trainable
%, the metric, train time, tokens/s, peak memory) and writes comparison.md, comparison.csv and
comparison.png (metric vs trainable parameters) into the sweep directory, or into out=DIR.
metric defaults to continual/average_accuracy (strategy=continual runs, whose backward transfer and
forgetting get columns too), else eval/macro_accuracy (multi-task runs, whose per-task eval/<task>/accuracy
get columns too), else eval/accuracy, else eval/exact_match, else eval/loss; eval.json (ftune eval)
wins over metrics.json (ftune train) where both have a metric."""


def parse_paths_args(argv: list[str], prog: str, usage: str, description: str, out_help: str) -> argparse.Namespace:
    """``PATH ... [out=X] [metric=KEY]`` (compare, report): paths, ``args.out`` and ``args.metric``."""
    parser = argparse.ArgumentParser(prog=prog, usage=usage, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="PATH", help="a run directory, or a directory holding runs")
    parser.add_argument("--out", default=None, metavar="PATH", help=out_help)
    parser.add_argument("--metric", default=None, metavar="KEY", help="the metric column (also metric=KEY)")
    args_in = []
    for a in argv:  # key=value, like the other commands
        key, sep, value = a.partition("=")
        if sep and key in ("out", "metric"):
            args_in += [f"--{key}", value]
        elif a in ("verbose=true", "verbose=True"):
            continue
        else:
            args_in.append(a)
    return parser.parse_args(args_in)


def main(argv: list[str]) -> dict[str, Any] | None:
    args = parse_paths_args(argv, "ftune compare", USAGE, DESCRIPTION,
                            "where to write (also out=DIR); default: the sweep dir")
    return compare(args.paths, args.out, args.metric)
