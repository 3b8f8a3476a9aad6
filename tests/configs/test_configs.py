"""Every shipped YAML composes and is read by the code that consumes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ftune.config import check_target, config_dir, validate_group
from ftune.data import task_of
from ftune.errors import FtuneError
from ftune.methods import METHODS, build_method

from conftest import compose_train

CONFIGS = config_dir()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_validate(name):
    cfg = compose_train([f"model={name}"], Path("/tmp/unused"))
    model = validate_group(cfg, "model")
    assert model.name == name
    assert (model.path is None) != (model.config is None), "a model config sets exactly one of path/config"


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_configs_validate(name):
    cfg = compose_train([f"dataset={name}"], Path("/tmp/unused"))
    if OmegaConf.is_missing(cfg.dataset, "path"):  # the generic format configs need a path from the user
        with pytest.raises(FtuneError, match="dataset.path"):
            validate_group(cfg, "dataset")
        cfg = compose_train([f"dataset={name}", "dataset.path=my.jsonl"], Path("/tmp/unused"))
    data = validate_group(cfg, "dataset")
    assert data.name == name
    assert task_of(data) in ("seq_cls", "causal_lm")


@pytest.mark.parametrize("name", options("method"))
def test_method_configs_build(name):
    cfg = compose_train([f"method={name}"], Path("/tmp/unused"))
    method = build_method(cfg.method)
    assert method.name in METHODS and method.settings.lr > 0
    # the Python API with only a name gets exactly what `method=<name>` composes
    assert build_method({"name": name}).settings == method.settings
    assert build_method({"name": name, "lr": 0.5}).settings.lr == 0.5


def test_every_registered_method_has_a_yaml():
    assert set(METHODS) <= set(options("method"))


@pytest.mark.parametrize("group", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_configs_instantiate(group):
    param = torch.nn.Parameter(torch.zeros(4))
    for name in options(group):
        cfg = compose_train([f"{group}={name}", "optimizer=sgd" if group == "scheduler" else ""][: 1 + (group == "scheduler")],
                            Path("/tmp/unused"))
        check_target(cfg[group], group)
        if group == "optimizer":
            opt = instantiate(cfg.optimizer)([param])
            assert opt.param_groups[0]["lr"] == pytest.approx(cfg.method.lr)
        else:
            opt = torch.optim.SGD([param], lr=1.0)
            sched = instantiate(cfg.scheduler)(opt, total_steps=10)
            lrs = []
            for _ in range(10):
                lrs.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
            assert max(lrs) <= 1.0 and lrs[-1] <= lrs[len(lrs) // 2] + 1e-9


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs_validate(name):
    cfg = compose_train([f"trainer={name}"], Path("/tmp/unused"), small=False)
    validate_group(cfg, "trainer")


def test_default_job_is_minilm_lora_on_bundled_sentiment():
    cfg = compose_train([], Path("/tmp/unused"), small=False)
    assert (cfg.model.name, cfg.method.name, cfg.dataset.name) == ("minilm", "lora", "sentiment")
    assert Path(cfg.model.path, "model.safetensors").exists()
    assert Path(cfg.dataset.path).exists() and Path(cfg.dataset.eval_path).exists()
