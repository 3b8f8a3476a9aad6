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


def test_default_job_trains_minilm_and_beats_chance(tmp_path):
    """`ftune train` with no arguments: pretrained MiniLM + LoRA on the bundled reviews, offline."""
    res = run_cli("train", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = list((tmp_path / "outputs").glob("*/*_lora"))
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["eval/accuracy"] > 0.8, metrics  # 400 held-out reviews, chance is 0.5
    assert f"eval/accuracy = {metrics['eval/accuracy']:.4f}" in res.stdout


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


def test_bitsandbytes_is_imported_only_by_runs_that_use_it(tmp_path):
    import subprocess
    import sys

    def imported(*args: str) -> bool:
        res = subprocess.run([sys.executable, "-c", IMPORTED, "train", *TINY, "trainer.max_steps=1", *args],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return "bitsandbytes imported: True" in res.stdout

    assert not imported("method=lora", f"output_dir={tmp_path / 'lora'}")
    assert imported("method=qlora", f"output_dir={tmp_path / 'qlora'}")
    assert imported("method=lora", "optimizer=adamw_8bit", f"output_dir={tmp_path / 'adam8'}")
    # eval of a 4-bit run needs it, eval of a LoRA run does not
    assert subprocess.run([sys.executable, "-c", IMPORTED, "eval", f"run={tmp_path / 'lora'}"], capture_output=True,
                          text=True, timeout=600).stdout.rstrip().endswith("bitsandbytes imported: False")
