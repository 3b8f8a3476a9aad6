"""`ftune report`: one self-contained HTML page for a run or a sweep, to open in any browser or share.

    ftune report runs/x                          a run: config, loss and eval curves, final metrics, model card
    ftune report runs/sweep                      a sweep: sortable table, metric vs trainable parameters, each
                                                 run's curves, failed runs and why
    ftune report runs/a runs/b runs/base out=reports/ab.html metric=harness/dates_mc/acc

Everything is inside the one file: plots are PNGs embedded as base64 data URIs, the table's data is in
the page, the sorting is a few lines of plain JavaScript. It needs no server and loads nothing from the
network. Runs are read the way ``ftune compare`` reads them (:func:`ftune.compare.load_row`: metrics.json,
then eval.json, failed runs with the first line of their error.txt); every text from a run is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from ftune.compare import (
    LOWER_IS_BETTER,
    RunRow,
    _fmt,
    best_index,
    build_table,
    collect_rows,
    is_run_dir,
    parse_paths_args,
)
from ftune.compare import plot as plot_metric_vs_trainable
from ftune.errors import FtuneError
from ftune.outputs import draw_loss, read_metrics

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: .5rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th { background: #f4f4f6; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.best td { background: #e8f5e9; font-weight: 600; } tr.failed td { color: #b71c1c; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f9; padding: .75rem; overflow-x: auto; font-size: 12px; }
.runs { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
.muted { color: #666; }
"""

# Click a header to sort by that column (again: the other way). Cells carry their raw value in data-value;
# numbers sort as numbers, empty cells last either way.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var v = row.cells[col].getAttribute("data-value");
        if (v === null || v === "") return null;
        var n = Number(v);
        return isNaN(n) ? v.toLowerCase() : n;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img class="plot" src="{uri}" alt="{_e(alt)}">'


def curves_png(rows: list[dict], title: str) -> bytes | None:
    """The run's curves from metrics.jsonl: training and eval loss against steps, and beside them every other
    eval metric that was logged more than once (accuracy, exact match, ...). None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = sorted({k for r in rows for k in r if k.startswith("eval/") and k not in ("eval/loss", "eval/examples")
                     and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)})
    others = [k for k in others if sum(k in r for r in rows) > 1]
    if not any("loss" in r or "eval/loss" in r for r in rows):
        return None
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(10 if others else 6, 3.6), squeeze=False)
    draw_loss(axes[0][0], rows, title)
    if others:
        ax2 = axes[0][1]
        for k in others:
            points = [(r["step"], r[k]) for r in rows if k in r and "step" in r]
            ax2.plot(*zip(*points), "o-", label=k, markersize=3)
        ax2.set_xlabel("optimizer step")
        ax2.set_title("eval metrics", fontsize=9)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _value(v: Any) -> str:
    """A cell's raw value for sorting."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, float) else str(v)


def metrics_table(metrics: dict[str, Any]) -> str:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if not scalars:
        return '<p class="muted">no metrics</p>'
    body = "".join(f'<tr><td class="text">{_e(k)}</td><td data-value="{_e(_value(v))}">{_e(_fmt(v))}</td></tr>'
                   for k, v in scalars.items())
    return f'<table class="metrics"><thead><tr><th class="text">metric</th><th>value</th></tr></thead><tbody>{body}</tbody></table>'


def comparison_table(header: list[str], body: list[list[Any]], best: int | None) -> str:
    text_cols = {"run", "method", "status"}
    head = "".join(f'<th class="{"text" if h in text_cols else "num"}" title="click to sort">{_e(h)}</th>' for h in header)
    rows = []
    for i, row in enumerate(body):
        cls = "best" if i == best else ("failed" if row[-1] == "failed" else "")
        cells = "".join(f'<td class="{"text" if h in text_cols else "num"}" data-value="{_e(_value(v))}">{_e(_fmt(v))}</td>'
                        for h, v in zip(header, row, strict=True))
        rows.append(f'<tr class="{cls}">{cells}</tr>')
    return (f'<table id="comparison" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace") if path.is_file() else None
    except OSError:
        return None


def run_section(row: RunRow, full: bool) -> str:
    """One run: its curves and final metrics; ``full`` (a one-run report) adds the model card and the config."""
    parts = [f'<section class="run" data-run="{_e(row.name)}">']
    if not full:
        parts.append(f'<h3>{_e(row.name)} <span class="muted">({_e(row.method)})</span></h3>')
    if row.failed:
        parts.append(f'<p class="failed">failed: {_e(row.error)}</p>')
    if full:
        parts.append("<h2>Final metrics</h2>" + metrics_table(row.metrics) + "<h2>Curves</h2>")
    png = curves_png(read_metrics(row.path / "metrics.jsonl"), f"{row.name} · {row.method}")
    parts.append(_img(png_data_uri(png), f"loss curves of {row.name}") if png
                 else '<p class="muted">no curves (no metrics.jsonl)</p>')
    confusion = row.path / "confusion.png"
    if full and confusion.is_file():
        parts.append(_img(png_data_uri(confusion.read_bytes()), f"confusion matrix of {row.name}"))
    if full:
        card = _read(row.path / "README.md")
        if card is not None:
            parts.append(f'<h2>Model card</h2><pre class="card">{_e(card)}</pre>')
        config = _read(row.path / "config.yaml")
        if config is not None:
            parts.append(f"<h2>Config</h2><details open><summary>config.yaml</summary><pre>{_e(config)}</pre></details>")
    else:
        parts.append(f"<details><summary>final metrics</summary>{metrics_table(row.metrics)}</details>")
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, body: str) -> str:
    # no external resource of any kind; the CSP says so to the browser too
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{STYLE}</style></head>
<body>
{body}
<script>{SORT_JS}</script>
</body></html>
"""


def build_report(paths: list[str | Path], metric: str | None = None) -> tuple[str, Path, dict[str, Any]]:
    """(the HTML, the folder it belongs in by default, a summary) for the runs in ``paths``."""
    rows, base, metric = collect_rows(paths, metric, "report")
    if len(rows) == 1 and len(paths) == 1 and is_run_dir(Path(str(paths[0])).expanduser()):
        row = rows[0]
        title = f"ftune report · {row.name}"
        head = (f"<h1>{_e(title)}</h1><p>Run <code>{_e(row.path)}</code> · method <b>{_e(row.method)}</b>"
                f"{' · <b class=failed>failed</b>' if row.failed else ''}</p>")
        html_text = page(title, head + run_section(row, full=True))
        return html_text, row.path, {"kind": "run", "runs": [row.path], "metric": metric}
    header, body = build_table(rows, metric)
    best = best_index(rows, metric)
    buf = io.BytesIO()
    plot_metric_vs_trainable(buf, rows, metric)
    failed = [r for r in rows if r.failed]
    lower = any(w in metric for w in LOWER_IS_BETTER)
    title = f"ftune report · {base.name} · {len(rows)} runs"
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<p><code>{_e(base)}</code> · metric <b>{_e(metric)}</b> ({'lower' if lower else 'higher'} is better"
        f"{'; best run highlighted' if best is not None else ''}) · click a column header to sort</p>",
        "<h2>Comparison</h2>", comparison_table(header, body, best),
        "<h2>Metric vs trainable parameters</h2>", _img(png_data_uri(buf.getvalue()), f"{metric} vs trainable parameters"),
    ]
    if failed:
        parts.append("<h2>Failed runs</h2><ul id=\"failed\">" + "".join(
            f"<li><b>{_e(r.name)}</b> ({_e(r.method)}): {_e(r.error)}</li>" for r in failed) + "</ul>")
    parts.append("<h2>Runs</h2><div class=\"runs\">" + "".join(run_section(r, full=False) for r in rows) + "</div>")
    return page(title, "\n".join(parts)), base, {"kind": "sweep", "runs": [r.path for r in rows], "metric": metric,
                                                  "header": header, "rows": body, "best": best}


def report(paths: list[str | Path], out: str | Path | None = None, metric: str | None = None) -> dict[str, Any]:
    """Write report.html for ``paths`` (into the run or sweep directory, or ``out``: a folder or a .html file)."""
    from ftune.progress import console

    text, folder, summary = build_report(paths, metric)
    target = Path(str(out)).expanduser() if out else folder
    if target.suffix.lower() not in (".html", ".htm"):
        target = target / "report.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise FtuneError(f"Cannot write the report to '{target}': {e.strerror}; pass out=<a writable folder or "
                         f".html file>.") from None
    console.print(f"[bold green]wrote[/] {target} ({len(text.encode()) / 1024:.0f} KB, {len(summary['runs'])} "
                  f"run{'s' if len(summary['runs']) != 1 else ''}; open it in a browser)", soft_wrap=True)
    return {**summary, "file": target}


USAGE = "ftune report PATH [PATH ...] [out=DIR|FILE.html] [metric=KEY]"
DESCRIPTION = """Write one self-contained report.html (plots and data embedded; no server, no network).
PATH is a run directory, or a directory of runs such as the output_dir of `ftune train -m ...`. One run:
its config, loss and eval curves, final metrics and model card. Several: the comparison table of
`ftune compare` (click a header to sort), the metric-vs-trainable-parameters plot, each run's curves and
the failed runs with their reason. Written into the run or sweep directory, or to out=."""


def main(argv: list[str]) -> dict[str, Any]:
    args = parse_paths_args(argv, "ftune report", USAGE, DESCRIPTION,
                            "a folder or .html file (also out=...); default: the run or sweep dir")
    return report(args.paths, args.out, args.metric)
