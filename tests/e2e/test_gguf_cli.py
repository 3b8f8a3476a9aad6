"""`ftune train` on a GGUF checkpoint from the command line, then `ftune eval` of the run: converted once."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from tiny_gguf import write_tiny_llama_gguf

pytest.importorskip("gguf")


def test_train_on_a_gguf_file_then_eval_reuses_the_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    write_tiny_llama_gguf(tmp_path / "m" / "tiny.gguf")
    run = tmp_path / "run"
    train = run_cli("train", "model=llama", f"model.path={tmp_path / 'm'}", "model.gguf_file=tiny.gguf",
                    "dataset=demo_chat", "method=lora", "trainer.max_steps=2", "trainer.batch_size=4",
                    "trainer.max_length=64", "trainer.progress=false", "dataset.max_samples=16",
                    "dataset.max_eval_samples=4", f"output_dir={run}")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert train.stdout.count("converted GGUF checkpoint tiny.gguf") == 1
    model = OmegaConf.load(run / "config.yaml").model
    assert (model.path, model.gguf_file) == (str(tmp_path / "m"), "tiny.gguf")

    ev = run_cli("eval", f"run={run}")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    assert "converted GGUF" not in ev.stdout and "using the converted model cached" in ev.stdout
    assert "eval/perplexity" in ev.stdout
