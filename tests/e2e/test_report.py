"""`ftune report` on real tiny runs: one run's page and a sweep's page (three runs, one failed job), read as
HTML, then opened in a real headless Chromium (Debian's `chromium`, driven by Playwright): the page renders,
a click on a header sorts the table, the plots are decoded images, and nothing is requested from the network."""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import pytest

from ftune.compare import compare
from ftune.report import report

from conftest import cli_inprocess

TINY = ["trainer.max_steps=4", "trainer.batch_size=4", "trainer.max_length=32", "trainer.log_every=1",
        "trainer.eval_every=2", "trainer.progress=false", "dataset.max_samples=16", "dataset.max_eval_samples=8"]
HOSTILE = '<script>window.hacked = 1</script><img src="http://example.com/x.png">'
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


ftune = cli_inprocess


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    ftune("train", "-m", "model=tiny_bert", "dataset=sentiment", "method=lora,bitfit,full", *TINY, f"output_dir={root}")
    # a job that fails (BitFit on a Llama: no biases) leaves error.txt; its text must reach the page escaped
    ftune("train", "-m", "model=tiny_llama", "dataset=demo_instructions", "method=bitfit", *TINY,
          "trainer.max_length=128", f"output_dir={root / 'llama'}")
    error = root / "llama" / "0_bitfit" / "error.txt"
    error.write_text(error.read_text().strip() + " " + HOSTILE + "\n")
    card = root / "0_lora" / "README.md"
    card.write_text(card.read_text() + "\n" + HOSTILE + "\n")
    return root


def external(text: str) -> list[str]:
    """Every URL the page would load (src, href, url(...), @import) that is not an embedded data URI."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(([^)]+)\)|@import\s+["']?([^"';]+)""", text)
    return [u for group in refs for u in group if u and not u.strip("'\"").startswith(("data:", "#"))]


def test_run_report(sweep):
    run = sweep / "0_lora"
    result = report([run])
    text = (run / "report.html").read_text()
    assert result["file"] == run / "report.html" and result["kind"] == "run"
    assert "<title>ftune report · 0_lora</title>" in text
    for section in ("Final metrics", "Curves", "Model card", "Config"):
        assert f"<h2>{section}</h2>" in text
    assert html.escape((run / "config.yaml").read_text()) in text  # the whole config, escaped
    assert text.count('src="data:image/png;base64,') == 1  # the loss and eval curves, embedded
    assert HOSTILE not in text and html.escape(HOSTILE) in text  # the card's text shown, never run
    assert "<script>window.hacked" not in text and external(text) == []
    metrics = (run / "metrics.json").read_text()
    assert '"eval/accuracy"' in metrics and "eval/accuracy" in text


def test_sweep_report(sweep, tmp_path):
    result = report([sweep], out=tmp_path / "page.html")
    text = (tmp_path / "page.html").read_text()
    table = compare([sweep], out=tmp_path)
    assert result["header"] == table["header"] and result["rows"] == table["rows"]  # the comparison's own table
    assert len(re.findall(r"<tr class=\"(?:best|failed|)\">", text)) == 4  # 3 runs + the failed job
    failed = text[text.index('<ul id="failed">'):]
    assert "llama/0_bitfit" in failed and "bias" in failed.lower() and html.escape(HOSTILE) in failed
    # the metric-vs-trainable plot and one curves plot per finished run, all embedded
    assert text.count('src="data:image/png;base64,') == 1 + 3
    assert "<script>window.hacked" not in text and external(text) == []
    # each cell carries the raw value the table sorts by
    col = result["header"].index("trainable %")
    body = text[text.index('<table id="comparison"'):]
    body = body[body.index("<tbody>"):body.index("</table>")]
    values = [float(v) for v in re.findall(r'data-value="([^"]*)"', body)[col::len(result["header"])] if v]
    assert sorted(values) == sorted(r[col] for r in table["rows"] if r[col] is not None)


def test_cli_report_and_bad_paths(sweep, tmp_path):
    assert "report.html" in ftune("report", str(sweep / "1_bitfit"), f"out={tmp_path}")
    assert (tmp_path / "report.html").is_file()
    with pytest.raises(SystemExit):
        ftune("report", str(tmp_path / "missing"))


def _browser():
    """(playwright's sync_playwright, the chromium executable), or a skip saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("SKIPPED, not passed: the browser test of `ftune report` needs Playwright's Python package "
                    "(pip install 'ftune[report-test]'); it did not run")
    exe = os.environ.get("FTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("SKIPPED, not passed: the browser test of `ftune report` needs a Chromium browser "
                    "(Debian: apt-get install chromium; or FTUNE_CHROMIUM=<path>); none was found, so it did not run")
    return sync_playwright, exe


def test_report_in_headless_chromium(sweep, tmp_path):
    sync_playwright, exe = _browser()
    result = report([sweep], out=tmp_path / "report.html")
    header = result["header"]
    col = header.index("trainable %")
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))

            def route(r):  # the page itself is a file; anything else is a request to the outside
                if r.request.url.startswith(("file://", "data:")):
                    return r.continue_()
                requests.append(r.request.url)
                return r.abort()

            page.route("**/*", route)
            page.goto((tmp_path / "report.html").as_uri())
            assert page.title() == f"ftune report · {sweep.name} · 4 runs"
            rows = page.locator("#comparison tbody tr")
            assert rows.count() == 4

            def column(i: int) -> list[str]:
                return page.eval_on_selector_all(
                    "#comparison tbody tr", f"rows => rows.map(r => r.cells[{i}].getAttribute('data-value'))")

            before = column(0)
            assert before == ["0_lora", "1_bitfit", "2_full", "llama/0_bitfit"]
            page.locator("#comparison thead th").nth(col).click()
            ascending = [float(v) if v else None for v in column(col)]
            numbers = [v for v in ascending if v is not None]
            assert numbers == sorted(numbers) and ascending[-1] is None  # the failed job's empty cell last
            assert page.locator("#comparison thead th").nth(col).get_attribute("aria-sort") == "ascending"
            assert column(0) == ["1_bitfit", "0_lora", "2_full", "llama/0_bitfit"]  # bias terms < LoRA < every weight
            page.locator("#comparison thead th").nth(col).click()
            descending = [float(v) for v in column(col) if v]
            assert descending == sorted(numbers, reverse=True)
            assert column(0)[:3] == ["2_full", "0_lora", "1_bitfit"]
            page.locator("#comparison thead th").nth(0).click()
            assert column(0) == before  # a text column sorts as text
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 4 and all(w > 0 for w in widths)
            assert page.evaluate("window.hacked === undefined")  # the escaped script never ran
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert requests == [] and errors == []
    assert shot.stat().st_size > 10_000
    print(f"\nscreenshot of the sweep report in headless Chromium: {shot}")
