"""4-bit NF4 quantization: the per-layer decision, and one numeric path on every CPU.

bitsandbytes picks its CPU code path by the processor: on CPUs with AVX512-BF16 a Linear4bit in eval
mode without grad repacks its weight for a bf16 kernel (scales rounded to bf16, and a reshape that fails
on layers narrower than a block); elsewhere it dequantizes and multiplies as in training. ftune turns the
repacked path off in every layer it builds, so training, eval, merge checks and resume compute the same
numbers on every CPU. The tests here that compare paths run everywhere; the one that shows the repacked
path itself needs such a CPU and says so when skipped (on other CPUs that path does not exist, so the
path ftune uses is the only one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftune.errors import FtuneError
from ftune.models import QUANT_BLOCK, quantize_4bit
from ftune.runs import load_run
from ftune.train import setup, train

from conftest import fixed_batch, logits_of

bnb = pytest.importorskip("bitsandbytes")


def has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16 as probe

    return bool(probe())


class Block(nn.Module):
    def __init__(self, widths: list[tuple[int, int]]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in widths)


def test_each_layer_is_quantized_only_when_its_width_fits_whole_blocks():
    torch.manual_seed(0)
    model = Block([(64, 32), (32, 64), (96, 64), (128, 16), (63, 64)])
    report: dict = {}
    quantize_4bit(model, torch.float32, torch.device("cpu"), skip=[], report=report)
    kinds = [type(m).__name__ for m in model.layers]
    assert kinds == ["Linear4bit", "Linear", "Linear", "Linear4bit", "Linear"]
    assert report["quantization/layers_4bit"] == 2 and report["quantization/layers_full_precision"] == 3
    assert report["quantization/full_precision_reason"] == (
        f"1 input width not a multiple of the {QUANT_BLOCK}-wide quantization block; "
        f"2 narrower than the {QUANT_BLOCK}-wide quantization block")
    for layer in model.layers:
        if isinstance(layer, bnb.nn.Linear4bit):
            assert layer.weight.quant_state.blocksize == QUANT_BLOCK
            assert layer.support_avx512bf16_for_cpu is False


def test_a_model_with_nothing_to_quantize_is_refused():
    model = Block([(32, 32), (48, 64)])
    with pytest.raises(FtuneError, match="no linear layer it can quantize.*method=lora"):
        quantize_4bit(model, torch.float32, torch.device("cpu"), skip=[])


def test_run_header_and_metrics_count_the_layers(make_cfg, tmp_path):
    # tiny_bert: per block query/key/value/attention output/intermediate read 32 inputs (kept), the FFN
    # output reads intermediate_size=64 (quantized); the pooler reads 32 (kept); the classifier is the head.
    cfg = make_cfg("method=qlora", "model=tiny_bert", "dataset=sentiment", "trainer.max_steps=1", "dataset.max_samples=8",
                   "dataset.max_eval_samples=4")
    metrics = train(cfg)
    layers = cfg.model.config.num_hidden_layers
    assert metrics["quantization/layers_4bit"] == layers
    assert metrics["quantization/layers_full_precision"] == 5 * layers + 1
    assert "eval/accuracy" in metrics  # eval in eval mode without grad: the narrow layers no longer fail


def test_eval_computes_as_training_does_and_a_reloaded_run_matches(make_cfg, tmp_path):
    cfg = make_cfg("method=qlora", "model=tiny_llama", "dataset=demo_instructions", "method.dropout=0.0",
                   "trainer.max_steps=2", "dataset.max_samples=8", "dataset.max_eval_samples=4")
    run = setup(cfg)
    batch = fixed_batch(run)
    run.model.train()
    with torch.no_grad():  # train mode: bitsandbytes never takes its repacked path here
        training_path = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    eval_path = logits_of(run.model, batch)  # eval mode, no grad: where the repacked path would start
    assert torch.equal(eval_path, training_path)
    quantized = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized)

    train(cfg)
    out = cfg.output_dir
    model = load_run(out, "cpu")[0]
    reloaded = logits_of(model, batch)
    model2 = load_run(out, "cpu")[0]
    assert torch.equal(logits_of(model2, batch), reloaded)  # and again: loading is deterministic


def test_resume_of_a_4bit_run_is_exact(make_cfg, tmp_path):
    common = ["method=qlora", "model=tiny_llama", "dataset=demo_instructions", "method.dropout=0.0",
              "scheduler=constant", "dataset.max_samples=16", "dataset.eval_fraction=null", "trainer.save_every=2"]
    whole = make_cfg(*common, "trainer.max_steps=4", out="whole")
    train(whole)
    half = make_cfg(*common, "trainer.max_steps=2", out="resumed")
    train(half)
    resumed = make_cfg(*common, "trainer.max_steps=4", "resume=auto", out="resumed")
    train(resumed)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not has_avx512bf16(), reason=(
    "this CPU has no AVX512-BF16, so bitsandbytes has only the dequantize-and-multiply CPU path, the one "
    "ftune uses everywhere; test_eval_computes_as_training_does covers it"))
def test_the_repacked_cpu_path_ftune_avoids_exists_here():
    """On this CPU bitsandbytes' own default would evaluate differently (and fail on narrow layers)."""
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    for_ftune = Block([(128, 64)])
    weight, bias = for_ftune.layers[0].weight.data.clone(), for_ftune.layers[0].bias.data.clone()
    quantize_4bit(for_ftune, torch.float32, torch.device("cpu"), skip=[])
    default = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")  # bitsandbytes' own
    default.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       blocksize=QUANT_BLOCK)
    default.bias = nn.Parameter(bias, requires_grad=False)
    default = default.to("cpu")
    assert default.support_avx512bf16_for_cpu
    layer = for_ftune.layers[0].eval()
    default.eval()
    with torch.no_grad():
        ours, theirs = layer(x), default(x)
    assert getattr(default.weight.quant_state, "packing_format_for_cpu", False)
    assert not torch.equal(ours, theirs)  # the bf16 kernel rounds differently
    assert torch.allclose(ours, theirs, atol=0.1)  # but it is the same layer

    narrow = bnb.nn.Linear4bit(32, 64, compute_dtype=torch.float32, quant_type="nf4")
    narrow.weight = bnb.nn.Params4bit(torch.randn(64, 32), requires_grad=False, quant_type="nf4")
    narrow = narrow.to("cpu").eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid for input"):
        narrow(torch.randn(2, 32))
