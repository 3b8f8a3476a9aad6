"""trainer.packing: packed rows give the per-sequence logits, loss and gradients; unsafe setups are refused."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ftune.data.collate import Collator
from ftune.errors import FtuneError
from ftune.evaluate import model_inputs, task_loss
from ftune.packing import check_packing, pack_examples, packed_batches
from ftune.train import setup, train

ARCHS = ["tiny_llama", "tiny_qwen", "tiny_gpt2"]


def lora_run(make_cfg, model: str, *overrides: str):
    """A set-up LoRA run (packing on: setup runs the separation check) with non-zero LoRA B matrices,
    so that every LoRA tensor gets a gradient."""
    run = setup(make_cfg(f"model={model}", "dataset=demo_instructions", "method=lora", "trainer.packing=true",
                         *overrides))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return run


def some_examples(run, n: int = 4) -> list[dict]:
    """``n`` training examples of different lengths."""
    seen, out = set(), []
    for e in run.data.train:
        if len(e["input_ids"]) not in seen:
            seen.add(len(e["input_ids"]))
            out.append(e)
        if len(out) == n:
            return out
    raise AssertionError("not enough distinct lengths")


def test_packed_rows_hold_every_example_once_within_the_budget_and_are_reproducible():
    rng = random.Random(0)
    lengths = [rng.randint(5, 100) for _ in range(300)]
    rows = packed_batches(lengths, 256, seed=3, epoch=0)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    # next-fit: a row is only closed when the next example does not fit
    assert all(sum(lengths[i] for i in row) + lengths[nxt[0]] > 256 for row, nxt in zip(rows, rows[1:]))
    assert packed_batches(lengths, 256, seed=3, epoch=0) == rows  # resume rebuilds the same order
    assert packed_batches(lengths, 256, seed=3, epoch=1) != rows


def test_a_packed_row_restarts_positions_and_never_predicts_across_examples():
    batch = pack_examples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 is not predicted from 7
    assert "attention_mask" not in batch
    assert model_inputs(batch)["use_cache"] is False
    flash = pack_examples([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
                          flash_attention=True)
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 5] and flash["max_length_q"] == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("model", ARCHS)
def test_packed_logits_equal_per_sequence_logits(make_cfg, model, attn):
    run = lora_run(make_cfg, model, f"model.attn_implementation={attn}")
    examples = some_examples(run)
    run.model.eval()
    with torch.no_grad():
        packed = run.model(**model_inputs(pack_examples(examples))).logits[0]
        start = 0
        for e in examples:
            alone = run.model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + len(alone)], alone, rtol=0, atol=1e-5)
            start += len(alone)
    assert start == packed.shape[0]


@pytest.mark.parametrize("model", ARCHS)
def test_packed_loss_and_lora_gradients_equal_token_weighted_per_sequence_ones(make_cfg, model):
    run = lora_run(make_cfg, model)
    examples = some_examples(run)
    lora = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    run.model.eval()  # no LoRA dropout: the same function in every call (gradients still flow)

    def loss_and_grads(batches: list[dict]) -> tuple[float, dict]:
        run.model.zero_grad(set_to_none=True)
        sums, targets = [], 0
        for batch in batches:
            loss_sum, n = task_loss(run.model(**model_inputs(batch)).logits, batch["labels"], "causal_lm")
            sums.append(loss_sum)
            targets += n
        loss = sum(sums) / targets
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in lora.items()}

    packed_loss, packed_grads = loss_and_grads([pack_examples(examples)])
    each_loss, each_grads = loss_and_grads([Collator(0, "causal_lm")([e]) for e in examples])
    padded_loss, _ = loss_and_grads([Collator(0, "causal_lm")(examples)])
    assert packed_loss == pytest.approx(each_loss, abs=1e-5) and packed_loss == pytest.approx(padded_loss, abs=1e-5)
    for n in lora:
        assert packed_grads[n].abs().sum() > 0, n
        torch.testing.assert_close(packed_grads[n], each_grads[n], rtol=1e-4, atol=1e-6)


def test_with_a_cache_or_a_2d_mask_transformers_lets_packed_sequences_mix(make_cfg):
    """Why ftune passes use_cache=False and no attention mask: either one undoes the separation."""
    run = lora_run(make_cfg, "tiny_llama")
    first, second = some_examples(run, 2)
    batch = pack_examples([first, second])
    run.model.eval()
    with torch.no_grad():
        alone = run.model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
        ids, pos = batch["input_ids"], batch["position_ids"]
        cached = run.model(input_ids=ids, position_ids=pos, use_cache=True).logits[0, -len(alone):]
        masked = run.model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                           use_cache=False).logits[0, -len(alone):]
        separate = run.model(**model_inputs(batch)).logits[0, -len(alone):]
    assert (cached - alone).abs().max() > 1e-3
    assert (masked - alone).abs().max() > 1e-3
    torch.testing.assert_close(separate, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_methods_are_refused(make_cfg, method):
    with pytest.raises(FtuneError, match=r"virtual tokens.*trainer\.packing=false"):
        setup(make_cfg("model=tiny_llama", "dataset=demo_instructions", f"method={method}", "trainer.packing=true"))


def test_a_model_that_ignores_position_ids_is_refused(make_cfg):
    run = lora_run(make_cfg, "tiny_llama")
    forward = run.model.forward
    run.model.forward = lambda *a, position_ids=None, **kw: forward(*a, **kw)  # as a model that drops them
    with pytest.raises(FtuneError, match=r"would let packed examples see each other.*trainer\.packing=false"):
        check_packing(run.model, "lora", run.device, None, run.model.config.vocab_size)


def test_a_model_that_takes_positions_from_the_attention_mask_is_refused(make_cfg):
    """OPT computes its positions from the attention mask and ignores position_ids: packing would mix."""
    with pytest.raises(FtuneError, match=r"see each other with this model \(opt, "):
        setup(make_cfg("model=tiny_llama", "model.config.model_type=opt", "dataset=demo_instructions", "method=full",
                       "trainer.packing=true"))


def test_classification_and_too_small_rows_are_refused(make_cfg):
    with pytest.raises(FtuneError, match=r"seq_cls task.*trainer\.packing=false"):
        setup(make_cfg("model=tiny_llama", "dataset=sentiment", "method=lora", "trainer.packing=true"))
    with pytest.raises(FtuneError, match="pack_tokens must be at least trainer.max_length"):
        setup(make_cfg("model=tiny_llama", "dataset=demo_instructions", "trainer.packing=true",
                       "trainer.max_length=128", "trainer.pack_tokens=64"))


def test_a_packed_step_equals_a_padded_step(make_cfg, tmp_path):
    """All 8 examples in one padded batch or one packed row: the same loss, the same updated weights."""
    from safetensors.torch import load_file

    common = ["model=tiny_llama", "dataset=demo_instructions", "dataset.max_samples=8", "dataset.eval_fraction=null",
              "method=full", "optimizer=sgd", "optimizer.momentum=0.0", "optimizer.lr=0.5", "scheduler=constant",
              "trainer.max_grad_norm=null", "trainer.batch_size=8", "trainer.max_steps=1"]
    train(make_cfg(*common, "trainer.packing=false", out="padded"))
    train(make_cfg(*common, "trainer.packing=true", out="packed"))
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("padded", "packed")}
    assert rows["packed"][0]["epoch"] == 1.0  # the whole epoch went into the one row
    assert rows["packed"][0]["loss"] == pytest.approx(rows["padded"][0]["loss"], abs=1e-5)
    a, b = (load_file(str(tmp_path / name / "adapter" / "weights.safetensors")) for name in ("padded", "packed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_a_padded_runs_checkpoint_is_not_resumed_with_packing(make_cfg, tmp_path):
    """The batch order of a packed run is another one: resuming across the switch is refused."""
    common = ["model=tiny_llama", "dataset=demo_instructions", "method=lora", "trainer.max_steps=2",
              "trainer.save_every=1"]
    train(make_cfg(*common, "trainer.packing=false"))
    with pytest.raises(FtuneError, match=r"tokens per packed row .*checkpoint has None, this run has 512"):
        train(make_cfg(*common, "trainer.packing=true", "trainer.max_steps=4", "resume=auto"))
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2  # nothing of the first run was touched
