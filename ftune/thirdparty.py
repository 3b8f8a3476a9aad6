"""What third-party libraries may do in a CLI run: print nothing, and import only what the run needs.

Libraries speak through Python's ``logging`` and ``warnings`` (transformers' loading reports, peft's
notices, bitsandbytes' kernel messages at import). A CLI run routes all of that into memory and writes
it to ``<run>/library.log``, so the console shows only what ftune prints and ftune's error paragraph is
always the last line; ``verbose=true`` shows the library output on the console as well.

bitsandbytes is imported only by runs that need it (4-bit methods, 8-bit optimizers). peft imports it
eagerly whenever it is installed, and on CPUs with AVX512-BF16 that import tries to load a kernel and
logs a failure; hiding the package from a run that does not use it keeps that run's start-up free of it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

LOG_NAME = "library.log"
_MAX_RECORDS = 5000  # a chatty library must not grow a long run's memory without bound


class LibraryLog(logging.Handler):
    """Keeps the library log records of the current job in memory until ``save_library_log``."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) >= _MAX_RECORDS:
            self.dropped += 1
            return
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted must not break training
            self.handleError(record)

    def take(self) -> list[str]:
        lines, dropped = self.lines, self.dropped
        self.lines, self.dropped = [], 0
        return lines + ([f"... {dropped} more records not kept"] if dropped else [])


_handler: LibraryLog | None = None


def capture_library_output(verbose: bool) -> None:
    """Route every library's log records and Python warnings into ``library.log`` (and, verbose, the console).

    Called once by the CLI before any library is imported by a job.
    """
    global _handler
    if _handler is None:
        _handler = LibraryLog()
        root = logging.getLogger()
        root.addHandler(_handler)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        if verbose:
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.addHandler(console)
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each warning once per place, into the log rather than stderr
    import transformers

    # transformers keeps its own stderr handler; hand its records to the root logger instead
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_info() if verbose else transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


def save_library_log(run_dir: Path) -> Path | None:
    """Write the records kept since the last call to ``run_dir/library.log`` (appending); None if none."""
    if _handler is None:
        return None
    lines = _handler.take()
    if not lines:
        return None
    path = Path(run_dir) / LOG_NAME
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    except OSError:
        return None
    return path


def needs_bitsandbytes(cfg: Any) -> bool:
    """Whether a train config (or a run's saved config) uses bitsandbytes: a 4-bit base, a 4-bit distillation
    teacher or an 8-bit optimizer."""
    method = cfg.get("method") or {}
    optimizer = cfg.get("optimizer") or {}
    strategy = cfg.get("strategy") or {}
    quantized = method.get("name") == "qlora" or bool(method.get("quantize")) or bool(strategy.get("teacher_4bit"))
    return quantized or str(optimizer.get("_target_", "")).startswith("bitsandbytes.")


def hide_bitsandbytes() -> None:
    """Make ``import bitsandbytes`` fail in this process, as if it were not installed.

    A ``None`` entry in ``sys.modules`` is Python's documented way to block an import: peft and
    transformers then treat bitsandbytes as absent (``importlib.util.find_spec`` returns None).
    Only for runs whose config does not use it, and only before peft is imported.
    """
    if "peft" not in sys.modules:
        sys.modules.setdefault("bitsandbytes", None)


def bitsandbytes_hidden() -> bool:
    return "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None
