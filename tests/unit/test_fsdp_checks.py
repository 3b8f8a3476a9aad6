"""trainer.distributed=fsdp: what FSDP2 cannot shard is refused with the reason before any process starts.

(The FSDP2 runs themselves, 2 CPU processes on gloo, are in tests/e2e/test_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch

from ftune.config import validate_group
from ftune.distributed import World
from ftune.errors import FtuneError
from ftune.methods.base import build_method
from ftune.strategies import build_strategy
from ftune.train import check_distributed

from conftest import compose_train

TWO = World(0, 2)


def check(*overrides: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    cfg = compose_train(["model=tiny_llama", "trainer.distributed=fsdp", "trainer.num_processes=2", *overrides])
    check_distributed(validate_group(cfg, "trainer"), build_method(cfg.method), build_strategy(cfg.get("strategy")),
                      TWO, device, dtype)


@pytest.mark.parametrize("overrides, words", [
    (["method=prompt_tuning"], ["method=prompt_tuning", "virtual-token"]),
    (["method=prefix_tuning"], ["method=prefix_tuning", "prompt encoder"]),
    (["method=peft", "method.peft_type=P_TUNING"], ["method=peft", "virtual-token"]),
    (["method=adalora"], ["method=adalora", "rank allocator"]),
    (["method=pissa"], ["method=pissa", "initial one"]),
    (["method=qlora"], ["method=qlora", "4-bit quantization state"]),
    (["method=dora", "method.quantize=true"], ["method=dora", "4-bit"]),
    (["trainer.keep_best=true", "trainer.eval_every=2"], ["keep_best", "slice"]),
    (["trainer.compile=true"], ["trainer.compile"]),
    (["trainer.precision=fp16"], ["fp16", "bf16"]),
    (["trainer.device=cpu", "trainer.fsdp_cpu_offload=true"], ["fsdp_cpu_offload", "drop"]),
    (["strategy=distill"], ["strategy=distill", "num_processes=1"]),
])
def test_what_fsdp_cannot_shard_is_refused_with_the_reason(overrides, words):
    with pytest.raises(FtuneError) as e:
        check(*overrides)
    text = str(e.value)
    assert "\n" not in text.strip()
    for word in words:
        assert word in text, text
    if not any(o.startswith(("strategy=", "trainer.fsdp_cpu_offload")) for o in overrides):
        assert "Use trainer.distributed=ddp" in text  # the way out


def test_what_auto_resolves_to_is_checked_in_each_process():
    with pytest.raises(FtuneError, match="fp16"):  # precision=auto on a GPU without bf16
        check(dtype=torch.float16)
    with pytest.raises(FtuneError, match="fsdp_cpu_offload"):  # device=auto found no GPU
        check("trainer.fsdp_cpu_offload=true", device=torch.device("cpu"))


@pytest.mark.parametrize("method", ["lora", "dora", "loraplus", "ia3", "full", "bitfit", "adapter_houlsby", "mam"])
def test_shardable_methods_pass(method):
    check(f"method={method}", "trainer.precision=bf16", device=torch.device("cpu"), dtype=torch.bfloat16)


def test_ddp_still_trains_what_fsdp_refuses():
    check("method=adalora", "trainer.distributed=ddp", "trainer.keep_best=true", "trainer.eval_every=2")


def test_cpu_offload_without_sharding_is_refused():
    for overrides in (["trainer.distributed=ddp"], ["trainer.distributed=fsdp", "trainer.num_processes=1"]):
        cfg = compose_train(["model=tiny_llama", "trainer.num_processes=2", "trainer.fsdp_cpu_offload=true", *overrides])
        with pytest.raises(FtuneError, match="not sharded"):
            check_distributed(validate_group(cfg, "trainer"), build_method(cfg.method), build_strategy(None), World())


def test_unknown_strategy_names_both():
    with pytest.raises(FtuneError, match="trainer.distributed=ddp .*trainer.distributed=fsdp"):
        check("trainer.distributed=zero3")
