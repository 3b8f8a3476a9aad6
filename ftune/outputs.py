"""The run directory: the contract between a training run and its users.

    <output_dir>/
      config.yaml      resolved config of the run
      adapter/         trained weights (peft format for peft methods, see each method's docstring)
      tokenizer/       the tokenizer, as save_pretrained writes it
      labels.json      class names in id order (classification)
      metrics.jsonl    one JSON object per logging step: step, loss, lr, tokens_per_s (+ eval rows)
      metrics.json     final metrics: eval/*, trainable_params, total_params, trainable_percent,
                       train_runtime_s, tokens_per_s, peak_memory_mb (+ data/skipped_rows with
                       dataset.bad_rows=skip: the bad rows left out of the data; with early stopping
                       or keep_best: best_metric, best_value, best_step, weights_from_step,
                       stopped_early_at_step)
      loss.png         training loss (and eval loss) against steps
      moe.png          an MoE model: load per expert and layer before/after training, top-k changes (moe/ metrics)
      README.md        model card: base model, method, data, command, metrics
      tensorboard/ wandb/ mlflow.db mlartifacts/   what the chosen experiment trackers (logger=) wrote
      trackers.json    their tracked runs' ids (MLflow, W&B), so that resume=auto continues those runs
      student/         strategy=distill with student_layers: the student cut from the teacher (its base model)
      stages/          a strategy's earlier stages, each a run directory (domain_adapt, continual)
      continual.json   strategy=continual: the accuracy matrix R[i][j], average accuracy, backward transfer,
      continual.png    forgetting; the matrix as a heatmap
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftune.errors import FtuneError

RUN_ARTIFACTS = ("config.yaml", "adapter", "tokenizer", "labels.json", "metrics.jsonl", "metrics.json",
                 "loss.png", "moe.png", "README.md", "checkpoints", "student", "eval.json", "error.txt", "confusion.png",
                 "eval_predictions.jsonl", "harness.json", "report.html", "comparison.md", "comparison.csv", "comparison.png",
                 "tensorboard", "wandb", "mlflow.db", "mlartifacts", "trackers.json", "domain_classifier.safetensors",
                 "heads", "tasks.json", "continual.json", "continual.png")
STAGES_DIR = "stages"  # a strategy's earlier stages (domain_adapt: stages/pretrain), kept by the run's own setup


def prepare_run_dir(path: Path, overwrite: bool, resume: bool) -> Path:
    """Create the run directory; refuse to reuse a non-empty one unless asked to.

    With ``overwrite=true`` only ftune's own artifacts are removed; other files are left alone.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FtuneError(f"output_dir '{path}' is a file, not a directory; choose another output_dir.")
    existing = [p.name for p in path.iterdir() if p.name != STAGES_DIR] if path.exists() else []
    if existing and not (overwrite or resume):
        raise FtuneError(
            f"output_dir '{path}' already exists and is not empty ({', '.join(sorted(existing)[:5])}). "
            f"Nothing was changed. Choose a new output_dir, continue the run with resume=auto, "
            f"or replace its results with overwrite=true."
        )
    if existing and overwrite and not resume:
        for name in RUN_ARTIFACTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".ftune_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise FtuneError(
            f"Cannot write to output_dir '{path}': {e.strerror}. Choose a writable output_dir "
            f"(and check free disk space)."
        ) from None
    return path


def save_config(cfg: DictConfig, path: Path) -> None:
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def load_run_config(run_dir: Path) -> DictConfig:
    file = Path(run_dir) / "config.yaml"
    if not file.exists():
        raise FtuneError(
            f"'{run_dir}' is not an ftune run directory (no config.yaml). Pass run=<the output_dir of a train run>."
        )
    return OmegaConf.load(file)


class MetricsLog:
    """Appends one JSON line per logging step to metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path, keep_until_step: int | None = None,
                 on_row: Callable[[dict[str, Any]], None] | None = None):
        self.path, self.on_row = path, on_row  # on_row: each row also goes there (the experiment trackers)
        if keep_until_step is not None and path.exists():  # resume: drop lines logged after the checkpoint
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif path.exists():
            path.unlink()

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.on_row is not None:
            self.on_row(row)



def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def draw_loss(ax, rows: list[dict], title: str) -> None:
    """Training loss per logging step and eval loss as points, on a matplotlib axes (loss.png, ftune report)."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r and "step" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()


def plot_loss(rows: list[dict], out: Path, title: str) -> None:
    """loss.png: training loss per logging step, eval loss as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    draw_loss(ax, rows, title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


_COMMAND: list[str] | None = None  # the ftune CLI's words as the user typed them: [command, *overrides]


def record_command(words: list[str]) -> None:
    """Remember the command line the user typed (the CLI rewrites sys.argv for Hydra)."""
    global _COMMAND
    _COMMAND = list(words)


def run_command(cfg: DictConfig) -> str:
    """The command that reproduces this run: what the user typed; for a sweep's job, that job alone."""
    if _COMMAND is None:
        return "ftune.train.train(cfg), from Python (config.yaml holds the config)"
    words = _COMMAND
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app
        hydra_cfg = None
    if hydra_cfg is not None and hydra_cfg.mode.name == "MULTIRUN":
        job = [o for o in hydra_cfg.overrides.task if not o.startswith("output_dir=")]
        words = [words[0], *job, f"output_dir={cfg.output_dir}"]
    return shlex.join(["ftune", *words])


def write_card(path: Path, cfg: DictConfig, metrics: dict[str, Any], extra: list[str] | None = None) -> None:
    """README.md: what was trained, on what, how to reproduce and load it (``extra``: a strategy's own section)."""
    model = cfg.model.path or f"{cfg.model.name} (built from config)"
    command = run_command(cfg)
    from ftune.moe import card_section

    rows = "\n".join(  # lists (an MoE's loads per layer) go to their own section
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
        if not isinstance(v, list)
    )
    strategy = cfg.get("strategy") or {}
    strategy = (f"- strategy: `{strategy.get('name')}`" + (f" (teacher `{strategy.get('teacher')}`)" if strategy.get("teacher")
                else "") + "\n") if strategy.get("name", "none") != "none" else ""
    text = f"""# ftune run: {cfg.method.name} on {cfg.dataset.name}

- base model: `{model}`
- method: `{cfg.method.name}`
{strategy}- data: `{cfg.dataset.path}` ({cfg.dataset.format})
- trust_remote_code: {cfg.model.trust_remote_code}
- command: `{command}`

## Metrics

| metric | value |
|---|---|
{rows}

{card_section(metrics)}
## Use

Weights are in `adapter/`; the resolved configuration is `config.yaml`.

```
ftune eval run={path}
```
"""
    if extra:
        text += "\n" + "\n".join(extra) + "\n"
    (path / "README.md").write_text(text)
