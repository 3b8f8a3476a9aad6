"""Continual learning: tasks trained one after the other, with a forgetting report (``strategy=continual``).

    ftune train model=minilm dataset=classification method=lora strategy=continual \\
        'strategy.stages=[{name: sst2, dataset: {path: sst2.csv, eval_path: sst2_dev.csv}},
                          {name: trec, dataset: {path: trec.csv, eval_path: trec_dev.csv}}]' \\
        strategy.ewc_lambda=1000          # or strategy.replay_ratio=0.25, or strategy.per_task_adapters=true

``strategy.stages`` lists the tasks in order; each entry is ``{name, dataset: {...}}``, the run's dataset
config (``dataset=...``) with the entry's keys on top. Every stage is a run of the one training loop
(the run's trainer, optimizer and method settings): the earlier ones in ``<run>/stages/<name>/``, the last
one is the run itself. Each stage starts from the previous stage's trained weights (the trainable
parameters: LoRA's matrices, or every weight with ``method=full``). After each stage, every task seen so
far is evaluated on its eval split: accuracy for classification, the answers' exact match for
instruction/chat data (``strategy.scorer``; greedy, ``trainer.eval_max_new_tokens`` tokens). The run writes
``continual.json`` (``matrix``: R[i][j], the score on task j after stage i, null for tasks not yet seen;
``average_accuracy``, ``backward_transfer``, ``forgetting``), ``continual.png`` (the matrix as a heatmap),
the table in the console and in README.md, and ``continual/*`` in metrics.json (``ftune compare`` shows
them as columns). With T stages (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

    average_accuracy  = 1/T     sum_j        R[T-1][j]
    backward_transfer = 1/(T-1) sum_{j<T-1}  R[T-1][j] - R[j][j]
    forgetting        = 1/(T-1) sum_{j<T-1}  max_{l<T-1} R[l][j] - R[T-1][j]

Heads: classification stages whose label sets differ each get their own head (a stage's model is the
previous encoder plus a new head for its labels; stages with the same label set share one); each task
is evaluated, and replayed, through its own head (the one saved when its label set last trained).
Causal-LM stages share one output space (the vocabulary).

Against forgetting (all off by default: naive fine-tuning):

- EWC (Kirkpatrick et al. 2017), ``strategy.ewc_lambda`` > 0: after each stage the diagonal Fisher
  information of the trainable parameters (a task's head among them only while later tasks train the
  same head, i.e. share its label set) is
  computed in fp32 **per example**, as the paper defines it: ``F_i = mean over examples of
  (d log p(y|x) / d theta_i)^2``, one backward per example (``strategy.fisher_samples`` examples of the
  stage's training data, at their labels: the empirical Fisher). Common libraries (Avalanche, many
  EWC repositories) instead average the squared gradients of mini-batch mean losses, which
  underestimates F by about the batch size and mixes examples' gradients before squaring. Later stages
  add ``(lambda/2) * sum_i F_i (theta_i - theta*_i)^2`` for each earlier task (theta* its weights
  after it trained) to the loss, normalised like the task loss (one penalty per optimizer step, the
  step's share of it in each micro-batch). ``strategy.ewc_online=true`` (online EWC, Schwarz et al.
  2018): one penalty, ``F <- ewc_gamma * F_old + F_new`` and theta* the latest weights.
- Replay, ``strategy.replay_ratio`` > 0: a buffer of ``strategy.replay_size`` training examples of the
  earlier tasks (``strategy.replay_policy``: ``reservoir``, a uniform sample of every example seen so
  far; ``balanced``, an equal share per task), of which every micro-batch gets so many that replayed
  examples make up ``replay_ratio`` of the examples trained on (allocated over each epoch, so the share
  is exact up to rounding). Drawn per (seed, stage, epoch) like the run's own batches, so a resumed run
  replays the same examples. Each replayed target weighs as much as a new one.
- Parameter isolation, ``strategy.per_task_adapters=true`` (a peft method, e.g. LoRA): each stage trains a
  fresh adapter on the frozen base, and task j is evaluated with its own adapter (loaded as the peft named
  adapter ``task_<j>``): the surveys' "independent parameters per task" (no forgetting by construction;
  the cost is one adapter per task, and the task must be known at inference).

Resume: ``resume=auto`` continues the stage that was killed from its own checkpoints; a finished stage
(its ``continual_state.pt`` written: weights, heads, Fisher, buffer, its row of R) is never trained again,
and the loop's checkpoints restore the position in the stage's data, whose batches (and replay draws) are
a pure function of (seed, stage, epoch).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from ftune.config import AT_LEAST_1, FRACTION, NOT_NEGATIVE, DatasetConfig, Range, ranged
from ftune.errors import FtuneError
from ftune.strategies.base import Stage, Strategy, StrategyContext, StrategySettings, file_identity, register_strategy

STATE_FILE = "continual_state.pt"  # in each earlier stage's directory: written when the stage finished
POLICIES = ("reservoir", "balanced")
SCORERS = ("exact_match", "gsm8k")


@dataclass
class ContinualSettings(StrategySettings):
    name: str = "continual"
    stages: List[Any] = field(default_factory=list)  # [{name: <task>, dataset: {<dataset keys>}}], in order
    ewc_lambda: float = ranged(0.0, NOT_NEGATIVE)  # 0: no EWC
    ewc_online: bool = False  # online EWC: one penalty, F <- ewc_gamma * F + F_new
    ewc_gamma: float = ranged(1.0, FRACTION)  # online EWC's decay of the earlier Fisher
    fisher_samples: int = ranged(200, AT_LEAST_1)  # training examples per task for the Fisher (one backward each)
    replay_ratio: float = ranged(0.0, Range(0, 1, high_open=True))  # share of replayed examples; 0: no replay
    replay_size: int = ranged(200, AT_LEAST_1)  # examples kept in the replay buffer (all earlier tasks)
    replay_policy: str = "reservoir"  # reservoir | balanced (an equal share per task)
    per_task_adapters: bool = False  # a separate (peft) adapter per task, chosen by task at eval
    scorer: str = "exact_match"  # causal LM: exact_match | gsm8k, the score of R
    # set by the run for its earlier stages (null: the run itself, the last stage)
    stage: Optional[int] = ranged(None, NOT_NEGATIVE, "for the run itself (the last stage)")


# --- the metrics of an accuracy matrix (tested on given matrices) ------------------------------------
def continual_metrics(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """Average accuracy, backward transfer (Lopez-Paz & Ranzato 2017) and forgetting (Chaudhry et al. 2018)
    of ``matrix`` (R[i][j]: the score on task j after stage i; entries j > i are not used)."""
    t = len(matrix)
    last = matrix[-1]
    average = sum(last[j] for j in range(t)) / t
    if t < 2:
        return {"average_accuracy": average, "backward_transfer": None, "forgetting": None}
    bwt = sum(last[j] - matrix[j][j] for j in range(t - 1)) / (t - 1)
    forgetting = sum(max(matrix[k][j] for k in range(j, t - 1)) - last[j] for j in range(t - 1)) / (t - 1)
    return {"average_accuracy": average, "backward_transfer": bwt, "forgetting": forgetting}


# --- EWC -------------------------------------------------------------------------------------------------
def fisher_diagonal(model: nn.Module, examples: list[dict], collator, task: str, device: torch.device,
                    params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of ``params`` in fp32: the mean over ``examples`` of the squared gradient
    of each example's own log-likelihood (one backward per example, as Kirkpatrick et al. define F; not the
    squared gradient of a batch's mean loss). A causal LM's log-likelihood is that of its target tokens."""
    from ftune.evaluate import model_inputs, task_loss

    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    was_training = model.training
    model.eval()  # theta* as it is used: no dropout
    names, tensors = list(params), list(params.values())
    for example in examples:
        batch = {k: v.to(device) for k, v in collator([example]).items()}
        logits = model(**model_inputs(batch)).logits
        nll, _ = task_loss(logits, batch["labels"], task)  # -log p(y|x), summed over the example's targets
        grads = torch.autograd.grad(nll, tensors, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    model.train(was_training)
    return {n: f / max(len(examples), 1) for n, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], terms: list[dict[str, dict[str, torch.Tensor]]],
                lam: float) -> torch.Tensor:
    """``sum over terms of (lam/2) * sum_i F_i (theta_i - theta*_i)^2`` in fp32 (each term: fisher, theta)."""
    total = None
    for term in terms:
        for n, f in term["fisher"].items():
            d = params[n].float() - term["theta"][n]
            value = (f * d * d).sum()
            total = value if total is None else total + value
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


def merge_online(old: dict[str, dict[str, torch.Tensor]] | None, fisher: dict[str, torch.Tensor],
                 theta: dict[str, torch.Tensor], gamma: float,
                 keep=lambda name: True) -> dict[str, dict[str, torch.Tensor]]:
    """Online EWC's one term: ``F <- gamma * F_old + F_new`` (for the parameters ``keep`` says the old term
    covers), theta* the latest weights."""
    merged = {n: gamma * old["fisher"][n] + f if old is not None and n in old["fisher"] and keep(n) else f.clone()
              for n, f in fisher.items()}
    return {"fisher": merged, "theta": {n: t.clone() for n, t in theta.items()}}


# --- replay ----------------------------------------------------------------------------------------------
def update_buffer(buffer: dict[str, Any], examples: list[dict], task: int, size: int, policy: str,
                  seed: int) -> dict[str, Any]:
    """The replay buffer after task ``task``'s training ``examples`` streamed by (a new dict).

    reservoir: Vitter's algorithm R over every example seen so far (each kept with probability
    size / seen); balanced: each task keeps an equal share (the earlier tasks' shares shrink), a uniform
    sample of its examples."""
    rng = random.Random(f"continual-buffer-{seed}-{task}")
    tagged = [{**e, "task": task} for e in examples]
    if policy == "reservoir":
        kept, seen = list(buffer.get("examples", [])), int(buffer.get("seen", 0))
        for e in tagged:
            seen += 1
            if len(kept) < size:
                kept.append(e)
            else:
                j = rng.randrange(seen)
                if j < size:
                    kept[j] = e
        return {"examples": kept, "seen": seen}
    per_task = {int(k): list(v) for k, v in buffer.get("per_task", {}).items()}
    order = list(range(len(tagged)))
    rng.shuffle(order)
    per_task[task] = [tagged[i] for i in order[:size]]
    tasks = sorted(per_task)
    shares = {t: size // len(tasks) + (1 if i < size % len(tasks) else 0) for i, t in enumerate(tasks)}
    per_task = {t: per_task[t][:shares[t]] for t in tasks}
    return {"per_task": {str(t): v for t, v in per_task.items()},
            "examples": [e for t in tasks for e in per_task[t]]}


def replay_counts(batch_sizes: list[int], ratio: float) -> list[int]:
    """Replayed examples for each batch so that they make up ``ratio`` of all the examples (cumulative
    rounding: the share over the epoch is exact up to one example)."""
    per_new = ratio / (1.0 - ratio)
    counts, new, given = [], 0, 0
    for b in batch_sizes:
        new += b
        target = math.floor(new * per_new + 0.5)
        counts.append(target - given)
        given = target
    return counts


# --- heads -----------------------------------------------------------------------------------------------
def head_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the outermost classification head (under peft its ModulesToSaveWrapper)."""
    from ftune.models import TASK_HEADS

    found = sorted((name.count("."), name) for name, _ in model.named_modules() if name.rpartition(".")[2] in TASK_HEADS)
    return (found[0][1], model.get_submodule(found[0][1])) if found else None


def inner_head(head: nn.Module) -> nn.Module:
    """The module that computes the head's output (peft: the active adapter's trained copy)."""
    if hasattr(head, "modules_to_save"):
        active = head.active_adapters
        return head.modules_to_save[active[0] if active else "default"]
    return head


def head_copy(template: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A frozen head of ``template``'s kind with the weights of ``state`` (which may have another number of
    classes: the parameters are replaced, not copied into)."""
    head = copy.deepcopy(template)
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = head.get_submodule(owner) if owner else head
        setattr(module, leaf, nn.Parameter(value.clone().to(device), requires_grad=False))
    return head.eval()


@contextlib.contextmanager
def head_swapped(head: nn.Module | None, other: nn.Module | None):
    """Inside: the model's head computes ``other``'s output (another task's head); None: unchanged."""
    if head is None or other is None:
        yield
        return
    handle = head.register_forward_hook(lambda module, args, output: other(*args))
    try:
        yield
    finally:
        handle.remove()


def stage_dir(root: Path, name: str) -> Path:
    from ftune.outputs import STAGES_DIR

    return Path(root) / STAGES_DIR / name


@register_strategy("continual")
class Continual(Strategy):
    settings_cls = ContinualSettings

    def __init__(self, settings: ContinualSettings):
        super().__init__(settings)
        self.entries = [dict(e) if isinstance(e, dict) else e for e in (settings.stages or [])]
        self.index = len(self.entries) - 1 if settings.stage is None else int(settings.stage)
        self.root: Path | None = None
        self.previous: dict[str, Any] = {}  # the state the previous stage left
        self.window = {"penalty": 0.0, "replay": 0.0, "steps": 0, "replayed": 0}
        self.row: list[float] = []
        self.fisher_terms: list[dict[str, dict[str, torch.Tensor]]] = []
        self.replay_groups: dict[str, list[dict]] = {}
        self.extra_heads: dict[str, nn.Module] = {}

    # --- settings --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [str(e["name"]) for e in self.entries]

    def check(self) -> None:
        s = self.settings
        example = ("'strategy.stages=[{name: sst2, dataset: {path: sst2.csv, eval_path: sst2_dev.csv}}, "
                   "{name: trec, dataset: {path: trec.csv, eval_path: trec_dev.csv}}]'")
        if len(self.entries) < 2:
            raise FtuneError(
                f"strategy=continual trains tasks one after the other and needs at least two stages in "
                f"strategy.stages (got {len(self.entries)}). List them on the command line, e.g. {example}, or in "
                f"a strategy/<name>.yaml of your own (`name: continual` and `stages:`) in a --config-dir.")
        seen: set[str] = set()
        for i, e in enumerate(self.entries):
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"].strip() \
                    or not isinstance(e.get("dataset", {}), dict) or set(e) - {"name", "dataset"}:
                raise FtuneError(
                    f"strategy.stages[{i}] must be {{name: <task>, dataset: {{<dataset keys>}}}} (got {e!r}): a "
                    f"task name and the dataset keys that differ from the run's dataset config, e.g. {example}.")
            name = e["name"]
            if name in seen or "/" in name or name.startswith("."):
                raise FtuneError(f"strategy.stages[{i}] has the name '{name}', which is "
                                 f"{'used twice' if name in seen else 'not a folder name'}: each stage needs a "
                                 f"name of its own (its run is <output_dir>/stages/<name>), e.g. sst2, trec.")
            seen.add(name)
            bad = sorted(set(e.get("dataset", {})) - {f.name for f in DatasetConfig.__dataclass_fields__.values()})
            if bad:
                raise FtuneError(f"strategy.stages[{i}] ({name}) sets unknown dataset keys {', '.join(bad)}. A stage's "
                                 f"dataset takes the keys of the dataset config: "
                                 f"{', '.join(DatasetConfig.__dataclass_fields__)}.")
        if not 0 <= self.index < len(self.entries):
            raise FtuneError(f"strategy.stage={s.stage} is not a stage of strategy.stages; leave strategy.stage "
                             f"unset (the run sets it for its earlier stages).")
        if s.replay_policy not in POLICIES:
            raise FtuneError(f"strategy.replay_policy must be reservoir or balanced (got '{s.replay_policy}'): "
                             f"reservoir keeps a uniform sample of every example seen, balanced an equal share per task.")
        if s.scorer not in SCORERS:
            raise FtuneError(f"strategy.scorer must be exact_match or gsm8k (got '{s.scorer}'): how causal-LM tasks' "
                             f"answers are scored after each stage.")
        if s.per_task_adapters and (s.ewc_lambda > 0 or s.replay_ratio > 0):
            raise FtuneError(
                "strategy.per_task_adapters=true trains a separate adapter per task on the frozen base, so nothing "
                "an earlier task learnt can be overwritten: EWC and replay have nothing to protect. Drop "
                "strategy.ewc_lambda and strategy.replay_ratio, or compare them in runs of their own.")

    def stage_dataset(self, base: dict[str, Any], index: int) -> dict[str, Any]:
        """Stage ``index``'s dataset config: the run's with the entry's keys on top (named after the stage)."""
        entry = self.entries[index]
        return {**base, "name": entry["name"], **dict(entry.get("dataset") or {})}

    def dataset_node(self, node: Any) -> Any:
        """The run itself trains the last stage (an earlier stage's run, its own)."""
        self.check()
        base = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
        self.base_dataset = base  # every stage's dataset is this with its entry's keys on top
        self.task_configs(base)  # every stage's dataset checked now, its errors named by stage
        return OmegaConf.create(self.stage_dataset(base, self.index))

    def task_configs(self, base: dict[str, Any]) -> list[DatasetConfig]:
        from ftune.config import validate_group
        from ftune.data import task_of
        from ftune.evaluate import has_eval_split

        configs = []
        for i in range(len(self.entries)):
            try:
                configs.append(validate_group(OmegaConf.create({"dataset": self.stage_dataset(base, i)}), "dataset"))
            except FtuneError as e:
                raise FtuneError(f"strategy.stages[{i}] ({self.names[i]}): {e}") from None
        tasks = {task_of(c) for c in configs}
        if len(tasks) > 1:
            raise FtuneError(
                f"strategy.stages mix tasks ({', '.join(f'{c.name}: {task_of(c)}' for c in configs)}): every stage "
                f"continues the same model, so all must be classification or all instruction/chat data.")
        for c in configs:
            if task_of(c) not in ("seq_cls", "causal_lm") or c.format == "text":
                raise FtuneError(
                    f"strategy=continual scores every task after each stage (accuracy, or the exact match of "
                    f"answers), and stage {c.name} is a {c.format} dataset with nothing to score. Use "
                    f"classification, instruction or chat data.")
            if not has_eval_split(c):
                raise FtuneError(
                    f"strategy=continual evaluates every task after each stage, and stage {c.name} has no eval split: "
                    f"add eval_path (or eval_fraction) to its dataset, e.g. {{name: {c.name}, dataset: {{path: "
                    f"{c.path}, eval_path: <file>}}}}.")
        evals = [(c.eval_path, c.name) for c in configs if c.eval_path]
        for path in {p for p, _ in evals}:
            users = [n for p, n in evals if p == path]
            paths = {c.path for c in configs if c.name in users}
            if len(users) > 1 and len(paths) > 1:
                raise FtuneError(
                    f"Stages {', '.join(users)} train on different files but are all evaluated on {path} (the run's "
                    f"dataset.eval_path, which a stage keeps unless its entry sets its own): give each stage its "
                    f"eval_path.")
        return configs

    def identity(self) -> dict[str, Any]:
        s = self.settings
        stages = [{"name": e["name"], "dataset": {k: file_identity(v) if k in ("path", "eval_path") else v
                                                  for k, v in dict(e.get("dataset") or {}).items()}}
                  for e in self.entries]
        return {"stages": json.loads(json.dumps(stages, default=str)), "stage": self.index,
                "ewc_lambda": s.ewc_lambda, "ewc_online": s.ewc_online, "ewc_gamma": s.ewc_gamma,
                "fisher_samples": s.fisher_samples, "replay_ratio": s.replay_ratio, "replay_size": s.replay_size,
                "replay_policy": s.replay_policy, "per_task_adapters": s.per_task_adapters}

    # --- the stages ------------------------------------------------------------------------------------
    def stages(self, cfg: Any) -> list[Stage]:
        from ftune.outputs import STAGES_DIR, prepare_run_dir

        if self.settings.stage is not None:  # an earlier stage's own run
            return []
        out = Path(cfg.output_dir)
        resume, overwrite = cfg.get("resume"), bool(cfg.get("overwrite"))
        full = OmegaConf.to_container(cfg, resolve=True)
        self.task_configs(full["dataset"])  # every stage's data checked before the first one trains
        if self.settings.per_task_adapters:
            from ftune.methods.base import build_method
            from ftune.methods.lora import PeftMethod

            if not isinstance(build_method(cfg.method), PeftMethod):
                raise FtuneError(per_task_refusal(cfg.method.name))
        if (out / STAGES_DIR).exists() and not (resume or overwrite):
            raise FtuneError(
                f"output_dir '{out}' already holds the stages of another run ({out / STAGES_DIR}). Nothing was "
                f"changed. Choose a new output_dir, continue the run with resume=auto, or replace its results "
                f"with overwrite=true.")
        prepare_run_dir(out, overwrite, resume is not None)
        if overwrite and not resume:
            shutil.rmtree(out / STAGES_DIR, ignore_errors=True)
        stages = []
        for i, name in enumerate(self.names[:-1]):
            where = stage_dir(out, name)
            stage_cfg = {**full, "output_dir": str(where), "overwrite": False, "resume": resume,
                         "dataset": full["dataset"],  # the stage's run applies its entry's keys
                         "strategy": {**full["strategy"], "stage": i}}
            stages.append(Stage(name, OmegaConf.create(stage_cfg), done=lambda w=where: (w / STATE_FILE).is_file(),
                                finish=lambda w=where: shutil.rmtree(w / "checkpoints", ignore_errors=True)))
        return stages

    def model_config(self, model_cfg, run_dir: Path):
        run_dir = Path(run_dir)
        self.root = run_dir if self.settings.stage is None else run_dir.parent.parent
        return model_cfg

    # --- building --------------------------------------------------------------------------------------
    def load(self, sctx: StrategyContext) -> None:
        from ftune.data import build_data

        s, i = self.settings, self.index
        self.sctx, self.task = sctx, sctx.task
        configs = self.task_configs(self.base_dataset)
        if i > 0:
            file = stage_dir(self.root, self.names[i - 1]) / STATE_FILE
            if not file.is_file():
                raise FtuneError(f"Stage {self.names[i]} continues from stage {self.names[i - 1]}, whose results "
                                 f"({file}) are missing. Run the whole sequence again with overwrite=true.")
            self.previous = torch.load(file, weights_only=True)
            mine = {k: v for k, v in self.identity().items() if k != "stage"}
            theirs = self.previous.get("identity", mine)
            changed = sorted(k for k in mine if theirs.get(k) != mine[k])
            if changed:
                raise FtuneError(
                    f"Stage {self.names[i - 1]} finished with other settings than this run's "
                    f"({', '.join(f'strategy.{k}' for k in changed)}), so stage {self.names[i]} cannot continue "
                    f"from it. Run the sequence again with overwrite=true, or with the settings it was trained with.")
        self.label_names = [list(x) for x in self.previous.get("label_names", [])] + [list(sctx.label_names)]
        # each task's eval examples (classification: ids in the order of the labels it trained with)
        self.evals: list[list[dict]] = []
        for j in range(i + 1):
            c = configs[j]
            if self.task == "seq_cls":
                c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(c), {"label_names": self.label_names[j]}))
            else:
                c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(c), {"train_on_prompt": False}))
            self.evals.append(build_data(c, sctx.tokenizer, sctx.max_length, sctx.seed, sctx.chat_template).eval)
        if s.ewc_lambda > 0:
            ewc = self.previous.get("ewc", [])
            self.fisher_terms = [dict(t) for t in ewc]  # each {fisher, theta, head: its task's head key}
        if s.replay_ratio > 0 and i > 0:
            groups: dict[str, list[dict]] = {}
            for e in self.previous["buffer"]["examples"]:
                groups.setdefault(self.head_key(int(e["task"])), []).append(
                    {k: v for k, v in e.items() if k != "task"})
            self.replay_groups = dict(sorted(groups.items()))

    def head_key(self, task: int) -> str:
        """Tasks sharing a head: the same label set (per-task adapters: every task its own); causal LM: one."""
        if self.task != "seq_cls":
            return "lm"
        if self.settings.per_task_adapters:
            return f"task_{task}"
        return json.dumps(self.label_names[task])

    def prepare(self, model: nn.Module, ctx: Any) -> None:
        from ftune.evaluate import TargetLogits

        s = self.settings
        self.model, self.device = model, ctx.device
        if s.per_task_adapters and not (hasattr(model, "peft_config") and hasattr(model, "add_adapter")):
            raise FtuneError(per_task_refusal(None))
        found = head_of(model) if self.task == "seq_cls" else None
        self.head_name, self.head = found if found else (None, None)
        heads = self.previous.get("heads", {})
        own = self.head_key(self.index)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # EWC's parameters: the trainable ones, with the head (kept only for a later task of the same labels)
        self.ewc_params = trained
        if self.index > 0 and not s.per_task_adapters:  # the previous stage's weights (a new head: its own)
            previous = self.previous["trainable"]
            with torch.no_grad():
                for n, p in trained.items():
                    if self.is_head(n):
                        continue
                    if n not in previous or previous[n].shape != p.shape:
                        raise FtuneError(f"Stage {self.names[self.index]} cannot continue from stage "
                                         f"{self.names[self.index - 1]}: its trainable parameter {n} is not in the "
                                         f"previous stage's weights. Every stage must use the same model and method.")
                    p.copy_(previous[n])
        if self.head is not None and own in heads:  # the label set trained before: its head continues
            with torch.no_grad():
                inner = inner_head(self.head)
                for k, v in heads[own].items():
                    inner.get_parameter(k).copy_(v)
        self.other_heads = {k: head_copy(inner_head(self.head), v, self.device) for k, v in heads.items()
                            if k != own} if self.head is not None else {}
        # a term's head entries count only while its task's head trains (the same label set)
        self.fisher_terms = [{part: {n: f.to(self.device) for n, f in t[part].items()
                                     if not self.is_head(n) or t.get("head") == own} for part in ("fisher", "theta")}
                             for t in self.fisher_terms]
        self.replay_scorer = TargetLogits(model) if self.task == "causal_lm" else None

    def is_head(self, name: str) -> bool:
        return self.head_name is not None and (name == self.head_name or name.startswith(self.head_name + "."))

    def header_lines(self) -> list[str]:
        s = self.settings
        how = []
        if s.ewc_lambda > 0:
            how.append(f"{'online ' if s.ewc_online else ''}EWC lambda={s.ewc_lambda:g}"
                       + (f" gamma={s.ewc_gamma:g}" if s.ewc_online else ""))
        if s.replay_ratio > 0:
            how.append(f"replay {s.replay_ratio:g} of a {s.replay_policy} buffer of {s.replay_size}"
                       + (f" ({sum(len(g) for g in self.replay_groups.values())} examples now)" if self.index else ""))
        if s.per_task_adapters:
            how.append("an adapter per task")
        return [f"continual: stage {self.index + 1} of {len(self.entries)} ({self.names[self.index]}), "
                f"{', '.join(how) or 'naive fine-tuning'}"]

    # --- training --------------------------------------------------------------------------------------
    def batches(self, batches: list[list[int]], epoch: int) -> list[dict[str, list[int]]]:
        """The run's batches; with replay, each with its share of buffer examples (per head: ``replay/<k>``)."""
        if not self.replay_groups:
            return [{"train": b} for b in batches]
        pool = [(g, k) for g, group in self.replay_groups.items() for k in range(len(group))]
        rng = random.Random(f"continual-replay-{self.sctx.seed}-{self.index}-{epoch}")
        out = []
        for b, n in zip(batches, replay_counts([len(b) for b in batches], self.settings.replay_ratio), strict=True):
            drawn = rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)
            feeds: dict[str, list[int]] = {"train": b}
            for g, k in drawn:
                feeds.setdefault(f"replay/{g}", []).append(k)
            out.append(feeds)
        return out

    def examples(self, feed: str) -> list[dict]:
        if feed.startswith("replay/") and feed[len("replay/"):] in self.replay_groups:
            return self.replay_groups[feed[len("replay/"):]]
        return super().examples(feed)

    def loss(self, model, batch, outputs, task_loss_sum, n_targets, step):
        from ftune.evaluate import model_inputs, task_loss

        own = targets_of(batch["labels"], self.task)
        total, replay_targets = task_loss_sum, 0
        for feed, rb in (batch.get("feeds") or {}).items():
            if not feed.startswith("replay/"):
                continue
            with head_swapped(self.head, self.other_heads.get(feed[len("replay/"):])):
                if self.replay_scorer is not None:
                    _, rsum, rn = self.replay_scorer.forward(model, rb, self.task)
                else:
                    rsum, rn = task_loss(model(**model_inputs(rb)).logits, rb["labels"], self.task)
            total = total + rsum
            replay_targets += rn
            self.window["replay"] += float(rsum.detach()) / max(rn, 1)
            self.window["replayed"] += 1
        # every target (new or replayed) weighs the same; the window's normaliser grows by the replayed share
        loss = total / (n_targets * (own + replay_targets) / max(own, 1))
        if self.fisher_terms:
            params = {n: p for n, p in self.ewc_params.items()}
            penalty = ewc_penalty(params, self.fisher_terms, self.settings.ewc_lambda)
            loss = loss + penalty * own / n_targets  # the step's penalty, this micro-batch's share of it
            self.window["penalty"] += float(penalty.detach()) * own / n_targets
        return loss

    def after_step(self, model, step):
        self.window["steps"] += 1

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        w, row = self.window, {}
        if self.fisher_terms and w["steps"]:
            row["strategy/ewc_penalty"] = w["penalty"] / w["steps"]
        if w["replayed"]:
            row["strategy/replay_loss"] = w["replay"] / w["replayed"]
        self.window = {"penalty": 0.0, "replay": 0.0, "steps": 0, "replayed": 0}
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.index, "window": dict(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("stage", self.index) != self.index:
            raise FtuneError(f"This checkpoint is of stage {state.get('stage')}, not of stage {self.index} "
                             f"({self.names[self.index]}); resume with the run's own output_dir.")
        self.window = {**self.window, **state.get("window", {})}

    # --- evaluation after the stage --------------------------------------------------------------------
    @contextlib.contextmanager
    def task_view(self, j: int):
        """The model as task ``j`` is scored: its head, and with per-task adapters its adapter."""
        key = self.head_key(j)
        other = self.other_heads.get(key) if key != self.head_key(self.index) else None
        adapter = None
        if self.settings.per_task_adapters and j != self.index:
            adapter = f"task_{j}"
            weights = torch.load(stage_dir(self.root, self.names[j]) / STATE_FILE, weights_only=True)["trainable"]
            self.model.add_adapter(adapter, self.model.peft_config["default"])
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for n, v in weights.items():
                    if not self.is_head(n):
                        params[n.replace(".default.", f".{adapter}.")].copy_(v)
            self.model.set_adapter(adapter)
        try:
            with head_swapped(self.head, other):
                yield adapter or "default"
        finally:
            if adapter is not None:
                self.model.set_adapter("default")
                self.model.delete_adapter(adapter)

    def score_task(self, j: int) -> float:
        from ftune.data.collate import Collator
        from ftune.evaluate import evaluate_examples, score_examples

        sctx, model = self.sctx, self.model
        was_training = model.training
        try:
            with self.task_view(j):
                if self.task == "seq_cls":
                    return evaluate_examples(model, self.evals[j], Collator(sctx.tokenizer.pad_token_id, "seq_cls"),
                                             "seq_cls", self.device, sctx.batch_size,
                                             sctx.autocast_dtype)["eval/accuracy"]
                scores, _ = score_examples(model, sctx.tokenizer, self.evals[j], self.settings.scorer,
                                           sctx.max_new_tokens, sctx.batch_size, self.device, self.names[j])
                return scores[self.settings.scorer]
        finally:
            model.train(was_training)

    def final_metrics(self, metrics: dict[str, Any], evaluate: Any) -> dict[str, Any]:
        """Every task seen so far scored (this stage's row of R); the Fisher for the next stages."""
        from ftune.progress import console

        self.row = [self.score_task(j) for j in range(self.index + 1)]
        self.matrix = [list(r) for r in self.previous.get("rows", [])] + [self.row]
        out: dict[str, Any] = {f"continual/{self.names[j]}": v for j, v in enumerate(self.row)}
        if self.index + 1 < len(self.entries):
            console.print(f"continual: after stage {self.names[self.index]}: "
                          + "  ".join(f"{self.names[j]} {v:.4f}" for j, v in enumerate(self.row)), markup=False)
            return out
        summary = continual_metrics(self.matrix)
        out.update({f"continual/{k}": v for k, v in summary.items() if v is not None})
        console.print(matrix_table(self.matrix, self.names, summary))
        return out

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """An earlier stage: its continual_state.pt (the next stage's start); the run: continual.json and .png."""
        run_dir = Path(run_dir)
        if self.index + 1 == len(self.entries):
            summary = continual_metrics(self.matrix)
            (run_dir / "continual.json").write_text(json.dumps(
                {"tasks": self.names, "matrix": padded(self.matrix), **summary,
                 "settings": {k: v for k, v in self.identity().items() if k not in ("stages", "stage")}}, indent=2))
            plot_matrix(self.matrix, self.names, run_dir / "continual.png", summary)
            return
        s = self.settings
        cpu = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        identity = {k: v for k, v in self.identity().items() if k != "stage"}
        state: dict[str, Any] = {"stage": self.index, "identity": identity, "rows": self.matrix,
                                 "label_names": self.label_names,
                                 "trainable": cpu, "heads": dict(self.previous.get("heads", {}))}
        if self.head is not None:
            state["heads"][self.head_key(self.index)] = {k: v.detach().float().cpu().clone()
                                                         for k, v in inner_head(self.head).named_parameters()}
        if s.ewc_lambda > 0:
            state["ewc"] = self.next_ewc_terms(model)
        if s.replay_ratio > 0:
            state["buffer"] = update_buffer(self.previous.get("buffer", {}), self.sctx.train_examples, self.index,
                                            s.replay_size, s.replay_policy, self.sctx.seed)
        tmp = run_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.rename(run_dir / STATE_FILE)  # the stage counts as finished only now

    def next_ewc_terms(self, model: nn.Module) -> list[dict[str, dict[str, torch.Tensor]]]:
        from ftune.data.collate import Collator
        from ftune.progress import console

        s, sctx = self.settings, self.sctx
        order = list(range(len(sctx.train_examples)))
        random.Random(f"continual-fisher-{sctx.seed}-{self.index}").shuffle(order)
        examples = [sctx.train_examples[k] for k in order[:s.fisher_samples]]
        with console.status(f"EWC: the Fisher of {len(self.ewc_params)} tensors over {len(examples)} examples"):
            fisher = fisher_diagonal(model, examples, Collator(sctx.tokenizer.pad_token_id, self.task), self.task,
                                     self.device, self.ewc_params)
        fisher = {n: f.cpu() for n, f in fisher.items()}
        theta = {n: p.detach().float().cpu().clone() for n, p in self.ewc_params.items()}
        own = self.head_key(self.index)
        if s.ewc_online:  # the earlier head's entries are merged only when this task trained the same head
            old = self.previous.get("ewc", [])
            return [{**merge_online(old[0] if old else None, fisher, theta, s.ewc_gamma,
                                    keep=lambda n: not self.is_head(n) or old[0].get("head") == own), "head": own}]
        return list(self.previous.get("ewc", [])) + [{"fisher": fisher, "theta": theta, "head": own}]

    def card_lines(self) -> list[str]:
        if self.index + 1 < len(self.entries) or not getattr(self, "matrix", None):
            return []
        return ["## Continual learning", "", *matrix_markdown(self.matrix, self.names, continual_metrics(self.matrix)),
                "", "![accuracy matrix](continual.png)"]


def per_task_refusal(method: str | None) -> str:
    return (f"strategy.per_task_adapters=true keeps a separate peft adapter per task (chosen by task at eval), and "
            f"{f'method={method}' if method else 'the run method'} trains no peft adapter. Use method=lora (or another peft method: dora, ia3, ...).")


def targets_of(labels: torch.Tensor, task: str) -> int:
    return labels.numel() if task == "seq_cls" else int((labels[:, 1:] != -100).sum())


def padded(matrix: list[list[float]]) -> list[list[float | None]]:
    """R as a square matrix: null where task j was not trained yet (j > i)."""
    t = len(matrix)
    return [list(row) + [None] * (t - len(row)) for row in matrix]


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def matrix_markdown(matrix: list[list[float]], names: list[str], summary: dict[str, Any]) -> list[str]:
    lines = ["| after stage \\ task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {names[i]} | " + " | ".join(_cell(v) for v in row) + " |" for i, row in enumerate(padded(matrix))]
    lines += ["", "  ".join(f"{k} {_cell(v)}" for k, v in summary.items())]
    return lines


def matrix_table(matrix: list[list[float]], names: list[str], summary: dict[str, Any]):
    from rich.table import Table

    caption = "  ".join(f"{k} {_cell(v)}" for k, v in summary.items())
    table = Table(title="continual: R[i][j], score on task j after stage i", caption=caption, header_style="bold")
    table.add_column("after stage")
    for n in names:
        table.add_column(n, justify="right")
    for i, row in enumerate(padded(matrix)):
        table.add_row(names[i], *[_cell(v) for v in row])
    return table


def plot_matrix(matrix: list[list[float]], names: list[str], out: Path, summary: dict[str, Any]) -> None:
    """continual.png: R as a heatmap (rows: after stage i; columns: task j), each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in padded(matrix)], dtype=float)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 1.8))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center",
                        color="black" if grid[i, j] > 0.6 else "white", fontsize=9)
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("task j")
    ax.set_ylabel("after stage i")
    ax.set_title("  ".join(f"{k.replace('_', ' ')} {_cell(v)}" for k, v in summary.items()), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
