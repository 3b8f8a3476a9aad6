"""`ftune compare` on a real multirun sweep (three tiny runs, one failed job, one base-model eval), the
sweep configs (Optuna search, SLURM launcher) and a 2-trial Optuna search."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ftune import cli
from ftune.compare import compare, differing_keys, load_row
from ftune.config import config_dir
from ftune.errors import FtuneError

from conftest import run_cli

TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=32", "trainer.log_every=1",
        "trainer.progress=false", "dataset.max_samples=16", "dataset.max_eval_samples=8"]


def ftune(*argv: str) -> str:
    """The CLI in this process (Hydra apps, real multiruns), its output returned."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        cli.main(list(argv))
    return buf.getvalue()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    # three real runs of one multirun sweep: 0_lora, 1_bitfit, 2_full
    ftune("train", "-m", "model=tiny_bert", "dataset=sentiment", "method=lora,bitfit,full", *TINY, f"output_dir={root}")
    # a job that fails (BitFit on a Llama, which has no biases): the sweep goes on and leaves error.txt
    ftune("train", "-m", "model=tiny_llama", "dataset=demo_instructions", "method=bitfit", *TINY,
          "trainer.max_length=128", f"output_dir={root / 'llama'}")
    # the baseline row: the base model with no adapter, evaluated on the same data
    ftune("eval", "model=tiny_bert", "dataset=sentiment", "eval.max_samples=8", f"out={root / 'base'}")
    return root


def test_sweep_layout(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_lora", "1_bitfit", "2_full", "base", "llama"]
    assert (sweep / "llama" / "0_bitfit" / "error.txt").exists()
    assert not (sweep / "llama" / "0_bitfit" / "metrics.json").exists()


def test_compare_table_csv_and_plot(sweep, tmp_path):
    result = compare([sweep], out=tmp_path)
    header, rows = result["header"], result["rows"]
    assert result["metric"] == "eval/accuracy"
    names = [r[0] for r in rows]
    assert names == ["0_lora", "1_bitfit", "2_full", "base", "llama/0_bitfit"]
    # the hyperparameters that differ: each method's lr; not what is shared, nor lora's own settings, which
    # only one run of this sweep has (they do not vary)
    assert {"method.lr", "optimizer.lr"} <= set(header)
    assert not {"model.name", "dataset.name", "trainer.max_steps", "output_dir", "method.name", "method.r"} & set(header)
    for col in ("run", "method", "trainable %", "eval/accuracy", "train time (s)", "tokens/s", "peak memory (MB)"):
        assert col in header
    by_name = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_name["1_bitfit"]["method"] == "bitfit" and by_name["1_bitfit"]["method.lr"] is not None
    assert by_name["2_full"]["trainable %"] == pytest.approx(100.0)
    failed = by_name["llama/0_bitfit"]
    assert failed["status"] == "failed" and failed["eval/accuracy"] is None
    assert by_name["base"]["method"] == "base" and by_name["base"]["status"] == "ok"
    for name in ("0_lora", "1_bitfit", "2_full"):
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        assert by_name[name]["eval/accuracy"] == metrics["eval/accuracy"]
        assert by_name[name]["tokens/s"] == metrics["tokens_per_s"]

    md = (tmp_path / "comparison.md").read_text()
    assert "| run | method |" in md and "## Failed runs" in md and "llama/0_bitfit" in md
    with (tmp_path / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == names
    assert "bias" in table[-1]["error"]  # why the failed job failed
    assert int(table[0]["trainable_params"]) == json.loads((sweep / "0_lora" / "metrics.json").read_text())["trainable_params"]
    from matplotlib.image import imread
    from PIL import Image

    with Image.open(tmp_path / "comparison.png") as img:
        img.verify()
        assert img.format == "PNG"
    pixels = imread(tmp_path / "comparison.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_compare_cli_writes_into_the_sweep_dir(sweep):
    for f in ("comparison.md", "comparison.csv", "comparison.png"):
        (sweep / f).unlink(missing_ok=True)
    proc = run_cli("compare", str(sweep), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0_lora" in proc.stdout and "failed" in proc.stdout
    assert all((sweep / f).stat().st_size > 0 for f in ("comparison.md", "comparison.csv", "comparison.png"))
    # a list of runs, with the metric chosen
    out = ftune("compare", str(sweep / "0_lora"), str(sweep / "2_full"), f"out={sweep / 'two'}", "metric=eval/loss")
    assert "eval/loss" in out
    assert len(list(csv.DictReader((sweep / "two" / "comparison.csv").open()))) == 2


def test_compare_refuses_what_holds_no_runs(tmp_path):
    with pytest.raises(FtuneError, match="holds no ftune runs"):
        compare([tmp_path])
    with pytest.raises(FtuneError, match="does not exist"):
        compare([tmp_path / "nope"])
    with pytest.raises(SystemExit) as e:
        ftune("compare", str(tmp_path))
    assert e.value.code == 2


def test_differing_keys_by_hand(tmp_path):
    for name, cfg in {"a": {"method": {"name": "lora", "r": 4}, "optimizer": {"lr": 1e-3}, "seed": 1, "output_dir": "a"},
                      "b": {"method": {"name": "lora", "r": 8}, "optimizer": {"lr": 1e-3}, "seed": 1, "output_dir": "b"},
                      "c": {"method": {"name": "full"}, "optimizer": {"lr": 1e-4}, "seed": 1, "output_dir": "c"}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    rows = [load_row(tmp_path / n, tmp_path) for n in "abc"]
    assert differing_keys(rows) == ["method.r", "optimizer.lr"]  # method.r: differs among the runs that have it
    rows = [load_row(tmp_path / n, tmp_path) for n in "ac"]
    assert differing_keys(rows) == ["optimizer.lr"]  # only one run has method.r: not a varied setting
    assert all(r.failed for r in rows)  # no metrics.json: not finished


def test_help_lists_every_command():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["--help"])
    for command in ("train", "eval", "merge", "generate", "compare", "report"):
        assert f"  {command} " in out.getvalue()
    with pytest.raises(SystemExit) as e:
        ftune("compare", "--help")
    assert e.value.code == 0


# --- sweeps at scale ------------------------------------------------------------------------------
def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=config, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", ["eval", "merge", "generate"])
def test_command_configs_compose(name):
    cfg = _compose(name, [])
    assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None
    if name == "eval":
        assert cfg.get("model") is None and cfg.get("dataset") is None and cfg.eval.split == "auto"
        cfg = _compose("eval", ["model=tiny_bert", "dataset=classification", "dataset.path=f.csv"])
        assert cfg.model.name == "tiny_bert" and cfg.dataset.path == "f.csv"


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 240
    assert launcher.submitit_folder.endswith("/.submitit/%j")


def test_optuna_search_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose("train", ["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"method", "method.r", "method.alpha", "optimizer.lr"}
    assert cfg.hydra.mode.name == "MULTIRUN"


def test_optuna_search_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = tmp_path / "search"
    ftune("train", "+hparams_search=optuna", "hydra.sweeper.n_trials=2", "model=tiny_bert", "dataset=sentiment",
          *TINY, f"output_dir={out}")
    trials = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(trials) == 2
    results = OmegaConf.load(out / "optimization_results.yaml")
    values = [json.loads((out / t / "metrics.json").read_text())["eval/accuracy"] for t in trials]
    assert results.best_value == pytest.approx(max(values))  # the metric the train job returns, maximized
    assert set(results.best_params) == {"method", "method.r", "method.alpha", "optimizer.lr"}
    assert compare([out])["metric"] == "eval/accuracy"
