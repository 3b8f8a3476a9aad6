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


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_configs_build(name):
    from ftune.strategies import STRATEGIES, build_strategy

    cfg = compose_train([f"strategy={name}"], Path("/tmp/unused"))
    strategy = build_strategy(cfg.strategy)
    assert strategy.name == name and name in STRATEGIES
    assert build_strategy({"name": name}).settings == strategy.settings  # the Python API gets the YAML's defaults


def test_every_registered_strategy_has_a_yaml():
    from ftune.strategies import STRATEGIES

    assert set(STRATEGIES) == set(options("strategy"))


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


def test_default_groups_are_the_quickstarts():
    cfg = compose_train([], Path("/tmp/unused"), small=False)
    assert (cfg.model.name, cfg.method.name, cfg.dataset.name) == ("smollm2", "lora", "dates")
    assert Path(cfg.dataset.path).exists() and Path(cfg.dataset.eval_path).exists()
    cfg = compose_train(["model=minilm", "dataset=sentiment"], Path("/tmp/unused"), small=False)
    assert Path(cfg.model.path, "model.safetensors").exists()  # the recipe sentiment_minilm_lora's parts
    assert Path(cfg.dataset.path).exists() and Path(cfg.dataset.eval_path).exists()


def _checked(overrides: list[str]):
    from ftune.config import check_settings

    cfg = compose_train(overrides, Path("/tmp/unused"), small=False)
    if OmegaConf.is_missing(cfg.dataset, "path"):
        cfg.dataset.path = "my.jsonl"
    check_settings(cfg, validate_group(cfg, "trainer"), validate_group(cfg, "dataset"), build_method(cfg.method).settings)


@pytest.mark.parametrize("group", ["dataset", "method", "optimizer", "scheduler", "trainer"])
def test_every_shipped_config_is_within_the_valid_ranges(group):
    for name in options(group):
        _checked([f"{group}={name}"] + (["optimizer=sgd"] if group == "scheduler" else []))


def test_every_numeric_setting_has_a_valid_range():
    """A new int/float setting must say its valid values (ftune.config.ranged), so none trains unchecked."""
    import dataclasses

    from ftune.config import SCHEMAS

    unchecked = []
    from ftune.strategies import STRATEGIES

    for schema in [*SCHEMAS.values(), *(m.settings_cls for m in METHODS.values()),
                   *(m.settings_cls for m in STRATEGIES.values())]:
        for f in dataclasses.fields(schema):
            numeric = any(t in str(f.type) for t in ("int", "float")) and "bool" not in str(f.type)
            if numeric and "range" not in f.metadata and f.name not in ("init_seed",):
                unchecked.append(f"{schema.__name__}.{f.name}")
    assert not unchecked


def test_impossible_numbers_are_all_refused_in_one_paragraph():
    bad = {"trainer.epochs=-1": "trainer.epochs must be positive", "trainer.max_steps=5": None,
           "dataset.eval_fraction=1.5": "dataset.eval_fraction must be above 0 and below 1, or null",
           "trainer.log_every=0": "trainer.log_every must be at least 1",
           "optimizer.lr=nan": "optimizer.lr must be positive (got nan)",
           "trainer.max_grad_norm=0": "trainer.max_grad_norm must be positive, or null for no clipping",
           "trainer.keep_checkpoints=0": "keep_checkpoints must be at least 1",
           "trainer.num_workers=-1": "trainer.num_workers must be at least 0",
           "trainer.eval_every=0": "trainer.eval_every must be at least 1",
           "scheduler.warmup_ratio=1.5": "scheduler.warmup_ratio must be at least 0 and at most 1",
           "optimizer.weight_decay=-0.1": "optimizer.weight_decay must be at least 0",
           "optimizer.betas=[0.9,1.5]": "optimizer.betas[1] must be at least 0 and below 1",
           "dataset.max_samples=0": "dataset.max_samples must be at least 1", "method.r=0": "method.r must be at least 1",
           "method.dropout=1.0": "method.dropout must be at least 0 and below 1",
           "scheduler.min_lr_ratio=inf": "scheduler.min_lr_ratio must be at least 0 and at most 1 (got inf)",
           "dataset.bad_rows=ignore": "dataset.bad_rows must be error or skip",
           "dataset.encoding=klingon": "dataset.encoding 'klingon' is not an encoding",
           "dataset.delimiter=ab": "dataset.delimiter must be one character"}
    with pytest.raises(FtuneError) as err:
        _checked(["method=lora", "dataset=classification", *bad])
    message = str(err.value)
    assert "\n" not in message and message.startswith("Invalid settings: ")
    for expected in filter(None, bad.values()):
        assert expected in message


RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_compose_and_pass_the_checks_of_a_run(name):
    """Each recipe composes as `ftune train recipes=<name>` would, and its settings pass every check a run
    makes before it loads anything (types, ranges, method and strategy settings)."""
    from ftune.config import recipes_dir
    from ftune.train import checked_settings

    # as `ftune train` does (--config-dir): the folder holding recipes/ makes it the `recipes` group
    cfg = compose_train([f"hydra.searchpath=[file://{recipes_dir().parent}]", f"recipes={name}"], Path("/tmp/unused"),
                        small=False)
    trainer, model, dataset, method, strategy = checked_settings(cfg)
    assert trainer.max_steps or trainer.epochs  # a recipe says how long it trains
