"""The real `ftune` CLI in a subprocess: run directory contract, multirun, config printing, refusals."""

from __future__ import annotations

import json

import torch
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
    assert "lora" in (out / "README.md").read_text()

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


def test_cfg_job_prints_config_and_trains_nothing(tmp_path):
    res = run_cli("train", "--cfg", "job", "method=qlora", cwd=tmp_path)
    assert res.returncode == 0
    assert "name: qlora" in res.stdout and "max_steps" in res.stdout
    assert not any(tmp_path.iterdir())


def test_default_job_trains_minilm_and_beats_chance(tmp_path):
    """`ftune train` with no arguments: pretrained MiniLM + LoRA on the bundled reviews, offline."""
    res = run_cli("train", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = list((tmp_path / "outputs").glob("*/*_lora"))
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["eval/accuracy"] > 0.8, metrics  # 400 held-out reviews, chance is 0.5
    assert f"eval/accuracy = {metrics['eval/accuracy']:.4f}" in res.stdout
