"""The strategy interface and registry.

A method says *what* trains (LoRA adapters, the last blocks, ...); a strategy says *how* the model is
trained: which extra models or modules take part (a teacher, a domain classifier), which loss terms
a step adds (knowledge distillation, a domain loss, EWC), which batches feed a step and which stages
a run goes through. One strategy per run (``strategy=none`` by default), chosen in
``configs/strategy/<name>.yaml``; it composes with the method (``strategy=distill method=lora``) and
runs inside the one training loop through the hooks below. A new strategy is one file with a
registered class, one YAML and its tests.

Hooks, in the order the trainer calls them::

    strategy = build_strategy(cfg.strategy)      # settings validated from configs/strategy/<name>.yaml;
                                                 # their numeric ranges join check_settings' one paragraph
    node = strategy.dataset_node(cfg.dataset)    # the run's dataset config before it is validated
                                                 # (multitask: the tasks' defaults, a missing path filled;
                                                 # continual: its last stage's)
    model_cfg = strategy.model_config(model_cfg, run_dir)   # the run's base model (distill with
                                                 # student_layers: the student cut from the teacher,
                                                 # saved to run_dir/student at the end); nothing loaded yet
    data = strategy.data(build, data_cfg, tokenizer)   # the run's data; build(cfg) reads a dataset config
                                                 # (multitask: the union of its tasks' data)
    strategy.load(sctx)                          # after tokenizer and data: load extra models (the
                                                 # teacher) or data (DANN's target domain) and check them
                                                 # against the tokenizer and labels (sctx also holds the
                                                 # training examples: distill caches teacher logits)
    model = strategy.base_model(build)           # the model the method applies to; build() loads model_cfg
    ... method.check / method.prepare ...
    strategy.prepare(model, ctx)                 # after the method: move extra models to the device,
                                                 # check they fit the prepared model
    groups += strategy.param_groups(lr)          # extra optimizer groups for the strategy's own trained
                                                 # modules (DANN's domain classifier, uncertainty
                                                 # weights); [] for none
    strategy.identity()                          # the settings a checkpoint must match to be resumed
                                                 # (distill: teacher, temperature, alpha, ...); {} for none
    strategy.header_lines()                      # lines for the run header
    ... per epoch: feeds = strategy.batches(batches, epoch)  # the epoch's micro-batches: for each, the
                                                 # example indices of every feed ("train": the run's own
                                                 # shuffled batches; DANN adds "target"); extra feeds'
                                                 # examples come from strategy.examples(feed) and reach
                                                 # loss() collated as batch["feeds"][feed]; the "train"
                                                 # indices reach it as batch["example_ids"] (a list)
    ... per micro-batch: loss = strategy.loss(model, batch, outputs, task_loss_sum, n_targets, step)
                                                 # the whole micro-batch loss: by default task_loss_sum /
                                                 # n_targets (targets of the accumulation window); a
                                                 # strategy reweights it and adds its terms, normalised by
                                                 # the same n_targets so grad_accum changes nothing
    ... per evaluation: metrics = strategy.evaluate(model, eval_examples, evaluate)   # evaluate(examples)
                                                 # scores a list of examples as the run does (multitask:
                                                 # each task's examples with its own head)
    ... per optimizer step: strategy.after_step(model, step)   # schedules (DANN's lambda_p), stage moves
    ... per logged row of metrics.jsonl: row.update(strategy.row_metrics(steps_done))   # "strategy/..." keys
    strategy.state_dict() / load_state_dict(state)   # checkpointed (strategy.pt); restored on resume
    metrics.update(strategy.final_metrics(metrics, evaluate))   # "strategy/..." keys of metrics.json
    strategy.save(model, run_dir)                # files the run needs to be loaded again (distill: student/)
    strategy.card_lines()                        # a section of its own for the run's README.md


Before all of this, ``train()`` runs the strategy's earlier stages::

    for stage in strategy.stages(cfg):           # domain_adapt: continued pretraining; [] for most
        if not stage.done(): train(stage.cfg); stage.finish()   # a whole run of the one loop, in
                                                 # <run>/stages/<name>/, resumed with the run's resume=

and the run itself is the last stage (its model may come from the earlier ones through
``model_config``). A stage that finished is never trained again, so ``resume=auto`` after a kill in a
later stage continues that stage.

``batches`` must be a pure function of (seed, epoch) like the run's own batch order, so that a resumed
run (which restores the epoch and the position in it) sees exactly the batches the uninterrupted one did.

Every numeric setting is declared with ``ranged(...)`` like the methods' settings, so a bad value is
refused before anything loads; word choices are checked by ``check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ftune.config import ModelConfig
from ftune.errors import FtuneError
from ftune.registry import registrar, settings_from


@dataclass
class StrategySettings:
    """Settings every strategy YAML carries; subclasses add their own fields (numbers with ``ranged``)."""

    name: str = "none"


@dataclass
class Stage:
    """A stage that trains before the run itself: a complete training config of its own."""

    name: str
    cfg: Any  # the composed config of the stage's run; its output_dir is <run>/stages/<name>
    done: Callable[[], bool]  # finished already (its result is in place): not trained again
    finish: Callable[[], None]  # after it trained: hand its result to the next stage (domain_adapt: the model)


@dataclass
class StrategyContext:
    """What a strategy knows about the run when it loads its extra models (after tokenizer and data)."""

    task: str  # "causal_lm" or "seq_cls"
    tokenizer: Any
    label_names: list[str]
    device: torch.device
    autocast_dtype: torch.dtype | None
    packing: bool = False
    report: dict[str, Any] = field(default_factory=dict)  # facts for metrics.json (keys "strategy/...")
    dataset: Any = None  # the run's DatasetConfig (how to read the strategy's own files of the same format)
    max_length: int = 512  # trainer.max_length: encode the strategy's own data as the run's
    seed: int = 0  # the run's seed: a strategy's own shuffles derive from it
    train_examples: list[dict] = field(default_factory=list)  # the run's encoded training examples, by index
    batch_size: int = 8  # the run's eval batch size: for a strategy's own forward passes over the examples
    # loss and accuracy of another model (distill's teacher) on the run's eval split, {} without one:
    # evaluate(model, target_logits) as final_metrics' evaluate
    evaluate: Callable[[nn.Module, Any], dict[str, float]] | None = None
    max_new_tokens: int = 32  # trainer.eval_max_new_tokens: a strategy's own scoring of generated answers
    chat_template: str | None = None  # the model config's: encode the strategy's own data as the run's


class Strategy:
    """Base class of every strategy, and ``strategy=none``: plain training on the task loss."""

    settings_cls: ClassVar[type[StrategySettings]] = StrategySettings
    # loss() reads the model's logits (distillation compares them with the teacher's); otherwise a
    # causal LM's task loss may be computed in chunks without them (trainer.chunked_loss)
    needs_logits: ClassVar[bool] = False

    def __init__(self, settings: StrategySettings):
        self.settings = settings

    @property
    def name(self) -> str:
        return self.settings.name

    # --- before loading ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise FtuneError for settings that type-check but cannot work (word choices, missing inputs)."""

    def stages(self, cfg: Any) -> list[Stage]:
        """The stages that train before the run itself (none here). Called before anything loads; a
        strategy with stages also prepares the run directory (it holds the stages' outputs)."""
        return []

    def model_config(self, model_cfg: ModelConfig, run_dir: Path) -> ModelConfig:
        """The run's base model config (recorded in config.yaml, used to load the run again)."""
        return model_cfg

    def dataset_node(self, node: Any) -> Any:
        """The run's ``dataset`` config node before it is validated (unchanged here)."""
        return node

    # --- building ----------------------------------------------------------------------------
    def data(self, build: Callable[[Any], Any], data_cfg: Any, tokenizer: Any) -> Any:
        """The run's DataBundle; ``build(dataset_cfg)`` reads and encodes a dataset config as the run does."""
        return build(data_cfg)

    def load(self, sctx: StrategyContext) -> None:
        """Load the strategy's extra models or data, checked against the run's tokenizer and labels."""

    def base_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        """The model the method is applied to; ``build()`` loads the run's model config."""
        return build()

    def prepare(self, model: nn.Module, ctx: Any) -> None:
        """After the method is applied: move extra models to the device and check they fit ``model``."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for the strategy's own trained modules (none here)."""
        return []

    def identity(self) -> dict[str, Any]:
        """The settings that change what this run trains and that a checkpoint must match to be resumed
        into it (beside the strategy's name), e.g. distill's teacher and temperature; {} for none. Values
        must survive a JSON round trip (str, numbers, bools, lists, None). Settings that cannot change a
        step (where the teacher's logits are kept, evaluation files) stay out, so they may change on resume."""
        return {}

    def header_lines(self) -> list[str]:
        return []

    # --- training ----------------------------------------------------------------------------
    def batches(self, batches: list[list[int]], epoch: int) -> list[dict[str, list[int]]]:
        """The micro-batches of ``epoch``: for each, the example indices of every feed.

        ``batches`` are the run's own (indices into the training split, shuffled per seed and epoch),
        fed as ``"train"``. A strategy may add feeds (DANN: ``"target"``, indices into
        ``examples("target")``) or choose other training batches; the result must depend only on the
        seed and ``epoch``."""
        return [{"train": b} for b in batches]

    def examples(self, feed: str) -> list[dict]:
        """The encoded examples of an extra feed that ``batches`` names."""
        raise KeyError(f"strategy {self.name} has no feed {feed!r}")

    def loss(self, model: nn.Module, batch: dict, outputs: Any, task_loss_sum: torch.Tensor, n_targets: int,
             step: int) -> torch.Tensor:
        """The micro-batch's loss: the summed task loss over the targets of the accumulation window.

        For a causal LM ``outputs.logits`` holds only the positions that have a target
        (``1 x targets x vocab``, in order; see ``ftune.evaluate.TargetLogits``). The strategy's own
        feeds (``batches``) are collated under ``batch["feeds"][name]``, on the device."""
        return task_loss_sum / n_targets

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called once per optimizer step, after optimizer.step()."""

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        """``strategy/...`` values for the training row being logged; {} for none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this strategy exactly (beyond the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""

    def evaluate(self, model: nn.Module, examples: list[dict],
                 evaluate: Callable[[list[dict]], dict[str, float]]) -> dict[str, float]:
        """The ``eval/...`` metrics of ``model`` on the run's eval ``examples``; ``evaluate(examples)`` scores a
        list of them as the run does (loss, accuracy)."""
        return evaluate(examples)

    # --- outputs -----------------------------------------------------------------------------
    def final_metrics(self, metrics: dict[str, Any],
                      evaluate: Callable[[nn.Module, Any], dict[str, float]]) -> dict[str, Any]:
        """``strategy/...`` values for metrics.json, given the run's ``metrics`` so far; ``evaluate(model,
        target_logits)`` scores another model on the eval split as the run's model is scored ({} without one)."""
        return {}

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """Write what loading the run needs beyond the method's adapter/ (distill: the student base model)."""

    def card_lines(self) -> list[str]:
        """Markdown lines of a section of the run's README.md (continual: the accuracy matrix); [] for none."""
        return []


def file_identity(path: str | None) -> str | None:
    """A strategy's data file in an identity: its absolute path when it is local (the same file named from
    another directory is the same), else as given (a hub id)."""
    if path is None:
        return None
    local = Path(str(path)).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


STRATEGIES: dict[str, type[Strategy]] = {}


register_strategy = registrar(STRATEGIES, "strategy")  # @register_strategy("name"): a Strategy subclass under one or more names


register_strategy("none")(Strategy)


def strategy_yaml_defaults(name: str) -> dict[str, Any]:
    """The settings of ``configs/strategy/<name>.yaml``; {} if there is none."""
    from omegaconf import OmegaConf

    from ftune.config import config_dir

    path = config_dir() / "strategy" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {}


def build_strategy(strategy_cfg: Any) -> Strategy:
    """Validate a strategy config (an OmegaConf node, a dict, or None for ``none``) and return its Strategy.

    Settings the config leaves out take the values of the strategy's YAML, as ``strategy=<name>`` would.
    """
    from omegaconf import OmegaConf

    import ftune.strategies  # noqa: F401  (registers every strategy)

    if strategy_cfg is None:
        raw: dict[str, Any] = {"name": "none"}
    else:
        raw = OmegaConf.to_container(strategy_cfg, resolve=True) if not isinstance(strategy_cfg, dict) \
            else dict(strategy_cfg)
    name = raw.get("name", "none")
    if name not in STRATEGIES:
        raise FtuneError(
            f"Unknown strategy '{name}'. Choose one of: {', '.join(sorted(STRATEGIES))} "
            f"(for example `ftune train strategy=distill strategy.teacher=runs/teacher`)."
        )
    cls = STRATEGIES[name]
    return cls(settings_from(cls.settings_cls, strategy_yaml_defaults(name), raw, "strategy", name))


__all__ = ["STRATEGIES", "Stage", "Strategy", "StrategyContext", "StrategySettings", "build_strategy",
           "file_identity", "register_strategy"]
