"""Shared fixtures: compose the real Hydra configs, clamp them small, run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import ftune.config  # noqa: F401  (registers the pkg_path resolver)
from ftune import models_gguf
from ftune.config import config_dir, validate_group

# One intra-op thread: tiny models gain nothing from more, and tests stay fast beside other work.
torch.set_num_threads(1)
# Experiment trackers (logger=...) never reach the network in tests: W&B offline, no telemetry.
os.environ.update({"WANDB_MODE": "offline", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"})

REPO = Path(__file__).resolve().parents[1]
FTUNE = Path(sys.executable).parent / "ftune"

# Small and fast, but a real run of the real pipeline.
SMALL = ["trainer.max_steps=4", "trainer.batch_size=4", "trainer.max_length=128", "trainer.log_every=1",
         "trainer.progress=false"]


def compose_train(overrides: list[str], output_dir: Path | None = None, small: bool = True) -> DictConfig:
    """The composed `configs/train.yaml` with ``overrides``, as `ftune train` would see it."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=(SMALL if small else []) + list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir) if output_dir else None
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, small: bool = True, out: str = "run") -> DictConfig:
        return compose_train(list(overrides), tmp_path / out, small=small)

    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `ftune` console script in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(FTUNE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_inprocess(*argv: str) -> str:
    """The ftune CLI in this process (real Hydra apps and multiruns, faster than a subprocess); its output."""
    import contextlib
    import io

    from ftune import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        cli.main(list(argv))
    return buf.getvalue()


def write_target(root: Path, n: int = 10) -> list[str]:
    """An unlabelled target domain (kitchen appliances) and its labelled eval file; the strategy's overrides."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / "target.jsonl"
    target.write_text("".join(json.dumps({"text": f"the blender {i} felt {'sturdy' if i % 2 else 'flimsy'}"}) + "\n"
                              for i in range(n)))
    evals = root / "target_eval.csv"
    evals.write_text("text,label\n" + "".join(f"the kettle {i} was {'great' if i % 2 else 'awful'},"
                                              f"{'positive' if i % 2 else 'negative'}\n" for i in range(6)))
    return ["strategy=dann", f"strategy.target_path={target}", f"strategy.target_eval_path={evals}"]


def fixed_batch(run, n: int = 4) -> dict:
    """The first ``n`` training examples of a set-up run, collated and on its device."""
    return {k: v.to(run.device) for k, v in run.collator(run.data.train[:n]).items()}


def logits_of(model, batch: dict) -> torch.Tensor:
    """Eval-mode logits of ``model`` on a collated batch."""
    from ftune.evaluate import model_inputs

    model.eval()
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The smollm2 model config, its GGUF file converted (timed) into a session-wide temporary $FTUNE_CACHE
    (which CLI subprocesses inherit, so the e2e tests reuse the conversion)."""
    old = os.environ.get("FTUNE_CACHE")
    os.environ["FTUNE_CACHE"] = str(tmp_path_factory.mktemp("ftune_cache"))
    saved, models_gguf._resolved = models_gguf._resolved, {}
    try:
        cfg = validate_group(compose_train(["model=smollm2"]), "model")
        started = time.perf_counter()
        folder = Path(models_gguf.resolve_gguf(cfg).path)
        yield cfg, folder, time.perf_counter() - started
    finally:
        models_gguf._resolved = saved
        if old is None:
            os.environ.pop("FTUNE_CACHE", None)
        else:
            os.environ["FTUNE_CACHE"] = old


def write_tasks(root: Path) -> dict[str, Path]:
    """Two classification tasks with their own columns and classes: sentiment (2) and question type (3)."""
    root.mkdir(parents=True, exist_ok=True)
    words = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "dull", "poor"]}
    files = {}
    for part, n in (("train", 24), ("dev", 8)):
        files[f"a_{part}"] = root / f"a_{part}.csv"
        files[f"a_{part}"].write_text("text,label\n" + "".join(
            f"the film {i} was {words['pos' if i % 2 else 'neg'][i % 3]},{'pos' if i % 2 else 'neg'}\n"
            for i in range(n)))
    for part, n in (("train", 18), ("dev", 6)):
        files[f"b_{part}"] = root / f"b_{part}.csv"
        files[f"b_{part}"].write_text("question,kind\n" + "".join(
            f"{['who', 'where', 'how many'][i % 3]} is thing {i},{['HUM', 'LOC', 'NUM'][i % 3]}\n" for i in range(n)))
    return files


def tasks_override(files: dict[str, Path], weight_b: float = 1.0) -> str:
    """strategy.tasks in Hydra's command-line list syntax, as a user types it."""
    return (f"strategy.tasks=[{{name: a, dataset: {{path: '{files['a_train']}', eval_path: '{files['a_dev']}'}}}}, "
            f"{{name: b, dataset: {{path: '{files['b_train']}', eval_path: '{files['b_dev']}', "
            f"text_column: question, label_column: kind}}, weight: {weight_b}}}]")
