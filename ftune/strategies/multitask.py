"""Multi-task learning: ``strategy=multitask``, several datasets trained at once on one shared model.

    ftune train model=minilm dataset=classification strategy=multitask \\
        'strategy.tasks=[{name: sst2, dataset: {path: sst2.csv, eval_path: sst2_dev.csv}},
                         {name: trec, dataset: {path: trec.csv, eval_path: trec_dev.csv}, weight: 2}]'

Each task's dataset config is the run's ``dataset`` (the defaults: format, columns, ...) overridden by the
entry's ``dataset`` keys, read and encoded by the ordinary data code (its own columns and classes). The
run trains on the union of the tasks' examples, and every micro-batch is drawn from one task:

* sampling (``strategy.sampling``): a task is drawn per micro-batch with probability
  ``proportional``: p_i ∝ n_i, ``uniform``: p_i = 1/K, or ``temperature``: p_i ∝ n_i^(1/T)
  (``strategy.temperature``), where n_i counts the task's training examples after the cap
  ``strategy.max_examples_per_task`` (T5's examples-proportional mixing). The task's examples come from its
  own shuffled order, reshuffled when used up. An epoch has as many micro-batches as the run's own
  (the union's size / batch size); the plan is a pure function of (seed, epoch), so a resumed run sees
  the same batches.
* heads (classification): one shared encoder and a head per task. The model's classification head is
  built with every task's classes (``labels.json``: ``<task>:<class>``) and each task owns its block of
  rows: a task's logits are that block alone (the other tasks' columns masked out of its softmax, so no
  gradient reaches them), which is exactly a separate linear head per task on the shared pooled output.
  Methods keep and save the head as for any classifier (LoRA's modules_to_save); each task's block is
  also written to ``heads/<task>.safetensors`` (``weight``, ``bias``) with ``tasks.json``, and
  :func:`load_task_heads` loads them back as ``nn.Linear`` heads.
* causal LM tasks: one LM; each task's examples start with the tag ``[<task>] `` (after a BOS token),
  which is not a target.
* loss weighting (``strategy.weighting``), for a micro-batch of task i with mean loss L_i:
  ``fixed``: w_i L_i (the task's ``weight``); ``uncertainty`` (Kendall et al. 2018): L_i / (2 exp(s_i)) +
  s_i / 2 with a learned s_i = log sigma_i^2 per task (its own optimizer group, lr ``strategy.weight_lr``
  or optimizer.lr, no weight decay; checkpointed); ``dwa`` (Liu et al. 2019, T = 2): w_i L_i with
  w_i(t) = K exp(r_i(t-1)/T) / sum_j exp(r_j(t-1)/T), r_i(t-1) = L_i(t-1) / L_i(t-2), where t counts
  **logging windows** (``trainer.log_every`` steps; an epoch is usually too long for fine-tuning) and
  L_i(t) is the task's mean loss over the window (a task absent from a window keeps its last mean);
  w_i = 1 until every task has two windows.
  The window's loss stays normalised by its targets, so grad_accum changes nothing.
* eval: each task's eval split scored with its own head: ``eval/<task>/loss`` and ``eval/<task>/accuracy``
  (causal LM: ``eval/<task>/perplexity``), ``eval/macro_accuracy`` (the mean over the tasks),
  ``eval/accuracy`` over every eval example and ``eval/loss`` the mean of the tasks' losses (what
  trainer.metric_for_best compares by default). ``ftune eval run=<run>`` scores each task again.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ftune.config import AT_LEAST_1, POSITIVE, DatasetConfig, ranged
from ftune.errors import FtuneError
from ftune.strategies.base import Strategy, StrategyContext, StrategySettings, file_identity, register_strategy

SAMPLING = ("proportional", "uniform", "temperature")
WEIGHTING = ("fixed", "uncertainty", "dwa")
DWA_TEMPERATURE = 2.0  # Liu et al.'s T
TASK_KEYS = ("name", "dataset", "weight")
TASKS_FILE, HEADS_DIR = "tasks.json", "heads"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
IGNORE = -100


@dataclass
class MultitaskSettings(StrategySettings):
    name: str = "multitask"
    tasks: List[Any] = field(default_factory=list)  # [{name, dataset: {...}, weight}]
    sampling: str = "proportional"  # proportional | uniform | temperature
    temperature: float = ranged(2.0, POSITIVE)  # sampling=temperature: p_i ∝ n_i^(1/T)
    max_examples_per_task: Optional[int] = ranged(None, AT_LEAST_1, "for every example")
    weighting: str = "fixed"  # fixed | uncertainty | dwa
    weight_lr: Optional[float] = ranged(None, POSITIVE, "for optimizer.lr")  # uncertainty: lr of the s_i


@dataclass
class Task:
    name: str
    dataset: dict[str, Any]  # the entry's dataset keys (over the run's dataset)
    weight: float = 1.0


# --- task sampling ---------------------------------------------------------------------------------------
def task_probabilities(sizes: list[int], sampling: str, temperature: float = 1.0) -> list[float]:
    """p_i of each task: proportional to n_i, uniform, or proportional to n_i^(1/T)."""
    if sampling == "uniform":
        raw = [1.0] * len(sizes)
    elif sampling == "proportional":
        raw = [float(n) for n in sizes]
    elif sampling == "temperature":
        raw = [float(n) ** (1.0 / temperature) for n in sizes]
    else:
        raise ValueError(sampling)
    total = sum(raw)
    return [r / total for r in raw]


def plan_epoch(sizes: list[int], probabilities: list[float], n_batches: int, batch_size: int, seed: int,
               epoch: int) -> list[tuple[int, list[int]]]:
    """``n_batches`` micro-batches of ``epoch``: (task, indices into that task's examples) each. The task is
    drawn with ``probabilities``; its examples come in an order shuffled per (seed, epoch, task), shuffled
    again whenever they run out. A pure function of its arguments."""
    rng = random.Random(f"multitask-{seed}-{epoch}")
    orders: list[list[int]] = [[] for _ in sizes]
    at = [0] * len(sizes)
    plan = []
    for task in rng.choices(range(len(sizes)), weights=probabilities, k=n_batches):
        take = min(batch_size, sizes[task])
        if at[task] + take > len(orders[task]):  # used up: the rest, then a fresh shuffle
            rest = orders[task][at[task]:]
            fresh = list(range(sizes[task]))
            random.Random(f"multitask-{seed}-{epoch}-{task}-{len(orders[task])}").shuffle(fresh)
            orders[task], at[task] = rest + fresh, 0
        plan.append((task, orders[task][at[task]:at[task] + take]))
        at[task] += take
    return plan


# --- loss weighting (each one formula; tested on fixed losses) ---------------------------------------------
class Weighting:
    """fixed: ``w_i L_i`` with the tasks' configured weights."""

    def __init__(self, weights: list[float]):
        self.fixed = list(weights)

    def term(self, task: int, loss: torch.Tensor, share: float = 1.0) -> torch.Tensor:
        """Task ``task``'s part of the objective for a mean loss ``loss``; ``share`` is the micro-batch's
        share of its accumulation window's targets (``loss`` is already scaled by it)."""
        return self.weights()[task] * loss

    def total(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The objective with every task's mean loss given (what a step estimates one task at a time)."""
        return sum(self.term(i, loss) for i, loss in enumerate(losses))

    def weights(self) -> list[float]:
        return self.fixed

    def window_done(self, means: dict[int, float]) -> None:
        """A logging window ended with these mean task losses (DWA's input)."""

    def parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class UncertaintyWeighting(Weighting):
    """Kendall et al. 2018: ``L_i / (2 exp(s_i)) + s_i / 2``, s_i = log sigma_i^2 learned (starts at 0)."""

    def __init__(self, n_tasks: int):
        super().__init__([1.0] * n_tasks)
        self.log_vars = nn.Parameter(torch.zeros(n_tasks))

    def term(self, task, loss, share=1.0):
        s = self.log_vars[task].to(loss.device)
        return loss * 0.5 * torch.exp(-s) + share * s / 2

    def weights(self) -> list[float]:
        return [0.5 * math.exp(-float(s)) for s in self.log_vars.detach()]

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def state_dict(self):
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state):
        if "log_vars" in state:
            with torch.no_grad():
                self.log_vars.copy_(state["log_vars"])


class DynamicWeightAveraging(Weighting):
    """Liu et al. 2019 (DWA): ``w_i = K exp(r_i / T) / sum_j exp(r_j / T)``, r_i = L_i(t-1) / L_i(t-2), over the
    tasks' mean losses of the last two windows; every w_i = 1 until each task has two."""

    def __init__(self, n_tasks: int, temperature: float = DWA_TEMPERATURE):
        super().__init__([1.0] * n_tasks)
        self.temperature = temperature
        self.history: list[list[float]] = [[] for _ in range(n_tasks)]  # the last two window means per task
        self.current = [1.0] * n_tasks

    def weights(self) -> list[float]:
        return self.current

    def window_done(self, means: dict[int, float]) -> None:
        for task, mean in means.items():
            self.history[task] = (self.history[task] + [mean])[-2:]
        k = len(self.history)
        if all(len(h) == 2 for h in self.history):
            ratios = [h[1] / h[0] if h[0] > 0 else 1.0 for h in self.history]
            exps = [math.exp(r / self.temperature) for r in ratios]
            self.current = [k * e / sum(exps) for e in exps]

    def state_dict(self):
        return {"history": [list(h) for h in self.history], "current": list(self.current)}

    def load_state_dict(self, state):
        if "history" in state:
            self.history = [list(h) for h in state["history"]]
            self.current = list(state["current"])


def build_weighting(name: str, tasks: list[Task]) -> Weighting:
    if name == "uncertainty":
        return UncertaintyWeighting(len(tasks))
    if name == "dwa":
        return DynamicWeightAveraging(len(tasks))
    return Weighting([t.weight for t in tasks])


# --- the heads ---------------------------------------------------------------------------------------------
def head_linear(model: nn.Module, width: int) -> nn.Linear:
    """The trained linear layer of the classification head whose outputs are the ``width`` logits (under
    peft's modules_to_save, the trained copy, not the original)."""
    from ftune.strategies.dann import classification_head

    head = classification_head(model)
    if head is None:
        raise FtuneError("strategy=multitask: the model has no classification head (a module named classifier or "
                         "score) after the method was applied; use a method that keeps it.")
    found = [m for name, m in head.named_modules() if isinstance(m, nn.Linear) and m.out_features == width
             and "original_module" not in name and "base_layer" not in name]
    if not found:
        raise FtuneError(f"strategy=multitask: the classification head has no linear layer with {width} outputs "
                         f"(one per class of every task) to split into the tasks' heads.")
    return found[-1]


def load_task_heads(run_dir: str | Path) -> dict[str, nn.Linear]:
    """Each classification task's head of a finished multitask run, from ``heads/<task>.safetensors``: an
    ``nn.Linear`` from the shared pooled output to the task's own classes (``tasks.json`` names them)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    heads = {}
    for task in json.loads((run_dir / TASKS_FILE).read_text())["tasks"]:
        if not task.get("labels"):
            continue
        tensors = load_file(str(run_dir / HEADS_DIR / f"{task['name']}.safetensors"))
        weight = tensors["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors)
        with torch.no_grad():
            head.weight.copy_(weight)
            if "bias" in tensors:
                head.bias.copy_(tensors["bias"])
        heads[task["name"]] = head
    return heads


@register_strategy("multitask")
class Multitask(Strategy):
    settings_cls = MultitaskSettings

    def __init__(self, settings: MultitaskSettings):
        super().__init__(settings)
        self.tasks = parse_tasks(settings.tasks) if settings.tasks else []
        self.weighting = build_weighting(settings.weighting, self.tasks) if settings.weighting in WEIGHTING else None
        self.run_path_missing = False
        self.task = "seq_cls"
        self.spans: list[tuple[int, int]] = []  # each task's examples in the union's train split: [start, end)
        self.eval_spans: list[tuple[int, int]] = []
        self.offsets: list[int] = []  # each task's first class id in the union's classes
        self.labels: list[list[str]] = []  # each task's own classes
        self.sizes: list[int] = []
        self.probabilities: list[float] = []
        self.seed = 0
        self.saved_labels: dict[str, list[str]] | None = None  # ftune eval: the classes a run trained on
        self.window = self._zeros()
        self.last: dict[str, float] = {}
        self.head: nn.Module | None = None
        self.masked_task: int | None = None

    def _zeros(self) -> dict[str, list[float]]:
        return {"loss": [0.0] * len(self.tasks), "targets": [0.0] * len(self.tasks)}

    # --- before loading ----------------------------------------------------------------------------------
    def check(self) -> None:
        s = self.settings
        if not self.tasks:
            raise FtuneError(
                "strategy=multitask needs its tasks: set strategy.tasks to a list of {name, dataset: {...}, weight}, "
                "e.g. 'strategy.tasks=[{name: sst2, dataset: {path: sst2.csv}}, {name: trec, dataset: {path: trec.csv}}]' "
                "on the command line, or in a strategy/<name>.yaml of your own passed with --config-dir."
            )
        if s.sampling not in SAMPLING:
            raise FtuneError(f"Unknown strategy.sampling '{s.sampling}'; choose one of {', '.join(SAMPLING)} "
                             f"(temperature: p_i ∝ n_i^(1/strategy.temperature)).")
        if s.weighting not in WEIGHTING:
            raise FtuneError(f"Unknown strategy.weighting '{s.weighting}'; choose one of {', '.join(WEIGHTING)} "
                             f"(fixed: each task's weight; uncertainty: Kendall et al.'s learned s_i; dwa: dynamic "
                             f"weight averaging).")

    def dataset_node(self, node: Any) -> Any:
        """The run's dataset defaults; a missing path (dataset=classification) is the first task's, so that the
        run's config names real data (each task reads its own)."""
        from omegaconf import OmegaConf

        self.check()  # no tasks: say so before the dataset's own missing path does
        if OmegaConf.is_missing(node, "path"):
            self.run_path_missing = True
            first = self.tasks[0].dataset.get("path")
            if first is None:
                raise FtuneError(f"strategy.tasks: task '{self.tasks[0].name}' has no dataset.path and the run's "
                                 f"dataset '{node.get('name', '?')}' has none either: give each task its data, e.g. "
                                 f"{{name: {self.tasks[0].name}, dataset: {{path: train.csv, eval_path: dev.csv}}}}.")
            node = OmegaConf.merge(node, {"path": first})
        return node

    def identity(self) -> dict[str, Any]:
        s = self.settings
        tasks = [{"name": t.name, "weight": t.weight,
                  "dataset": {k: file_identity(v) if k in ("path", "eval_path") else v
                              for k, v in sorted(t.dataset.items())}} for t in self.tasks]
        return {"tasks": tasks, "sampling": s.sampling, "temperature": s.temperature,
                "max_examples_per_task": s.max_examples_per_task, "weighting": s.weighting, "weight_lr": s.weight_lr}

    # --- building ----------------------------------------------------------------------------------------
    def task_config(self, task: Task, run_dataset: DatasetConfig) -> DatasetConfig:
        """The run's dataset config with the task's keys on top (its name is the task's)."""
        import dataclasses

        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        base = OmegaConf.structured(run_dataset)
        if self.run_path_missing:
            base.path = "???"
        try:
            merged = OmegaConf.merge(base, {**task.dataset, "name": task.name})
            cfg: DatasetConfig = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            keys = ", ".join(f.name for f in dataclasses.fields(DatasetConfig))
            what = (str(getattr(e, "msg", e)).strip().splitlines() or ["?"])[0]
            raise FtuneError(f"strategy.tasks: task '{task.name}' has a bad dataset setting: {what}. A task's dataset "
                             f"takes the dataset keys ({keys}).") from None
        if self.saved_labels is not None and task.name in self.saved_labels:
            cfg = dataclasses.replace(cfg, label_names=self.saved_labels[task.name] or cfg.label_names)
        if self.settings.max_examples_per_task:
            cap = self.settings.max_examples_per_task
            cfg = dataclasses.replace(cfg, max_samples=min(cfg.max_samples or cap, cap))
        return cfg

    def data(self, build: Callable[[DatasetConfig], Any], data_cfg: DatasetConfig, tokenizer: Any) -> Any:
        """The union of the tasks' data: classes offset per task, causal LM examples tagged."""
        from ftune.data import DataBundle, task_of
        from ftune.data.checks import DataReport

        self.tag_ids = {t.name: tokenizer.encode(f"[{t.name}] ", add_special_tokens=False) for t in self.tasks}
        self.bos = tokenizer.bos_token_id
        self.offsets, self.labels, self.spans, self.eval_spans = [], [], [], []
        configs = [self.task_config(t, data_cfg) for t in self.tasks]
        for t, cfg in zip(self.tasks, configs, strict=True):
            if OmegaConf_missing(cfg.path):
                raise FtuneError(f"strategy.tasks: task '{t.name}' has no dataset.path and the run's dataset has none "
                                 f"either: give it its data, e.g. {{name: {t.name}, dataset: {{path: train.csv}}}}.")
        kinds = {t.name: task_of(c) for t, c in zip(self.tasks, configs, strict=True)}
        if set(kinds.values()) - {"seq_cls", "causal_lm"} or len(set(kinds.values())) > 1:
            raise FtuneError(
                "strategy=multitask trains either classification tasks (a head each on one encoder) or causal LM tasks "
                f"(one LM, each task's prompts tagged), all of one kind; these tasks are {kinds}. Give every task the "
                f"same dataset.format (classification, or instruction/chat/text)."
            )
        self.task = next(iter(kinds.values()))
        train, evals, names = [], [], []
        report = DataReport(data_cfg.bad_rows)
        stats = {}
        for t, cfg in zip(self.tasks, configs, strict=True):
            try:
                bundle = build(cfg)
            except FtuneError as e:
                raise FtuneError(f"strategy.tasks: task '{t.name}': {e}") from None
            if self.task == "seq_cls" and len(bundle.label_names) < 2:
                raise FtuneError(
                    f"strategy.tasks: task '{t.name}' has {len(bundle.label_names)} class"
                    f"{'' if len(bundle.label_names) == 1 else 'es'} in column '{cfg.label_column}' of {cfg.path}; a "
                    f"classification task needs at least two labels. Check its label_column (or label_names)."
                )
            offset = len(names)
            self.offsets.append(offset)
            self.labels.append(list(bundle.label_names))
            names += [f"{t.name}:{label}" for label in bundle.label_names]
            self.spans.append((len(train), len(train) + len(bundle.train)))
            self.eval_spans.append((len(evals), len(evals) + len(bundle.eval)))
            train += [self._own(e, t.name, offset) for e in bundle.train]
            evals += [self._own(e, t.name, offset) for e in bundle.eval]
            for part, skipped in bundle.report.parts.items():
                report.parts[f"{t.name}/{part}"] = skipped
            stats = stats or bundle.stats
        self.sizes = [end - start for start, end in self.spans]
        self.probabilities = task_probabilities(self.sizes, self.settings.sampling, self.settings.temperature)
        return DataBundle(self.task, train, evals, names, stats, report)

    def _own(self, example: dict, name: str, offset: int) -> dict:
        """A task's example in the union: its class id offset (classification), or its tag in front (LM)."""
        if self.task == "seq_cls":
            return {**example, "labels": example["labels"] + offset}
        tag = self.tag_ids[name]
        ids, at = example["input_ids"], int(bool(example["input_ids"]) and example["input_ids"][0] == self.bos)
        out = {**example, "input_ids": ids[:at] + tag + ids[at:], "labels": example["labels"][:at] + [IGNORE] * len(tag)
               + example["labels"][at:]}
        if "token_type_ids" in example:
            out["token_type_ids"] = example["token_type_ids"][:at] + [0] * len(tag) + example["token_type_ids"][at:]
        return out

    def load(self, sctx: StrategyContext) -> None:
        if sctx.packing:
            raise FtuneError("strategy=multitask draws every micro-batch from one task, and trainer.packing=true joins "
                             "examples into rows regardless of their task. Use trainer.packing=false.")
        self.seed = sctx.seed

    def prepare(self, model: nn.Module, ctx: Any) -> None:
        if ctx is not None:  # the learned s_i beside the model (one device for the fused optimizer)
            for p in self.weighting.parameters():
                p.data = p.data.to(ctx.device)
        if self.task == "seq_cls":
            from ftune.strategies.dann import classification_head

            self.head = classification_head(model)
            self.head_layer = head_linear(model, self.offsets[-1] + len(self.labels[-1]))
            self.head.register_forward_hook(self._mask_logits)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        params = self.weighting.parameters()
        return [{"params": params, "lr": self.settings.weight_lr or lr, "weight_decay": 0.0}] if params else []

    def header_lines(self) -> list[str]:
        s = self.settings
        parts = [f"{t.name} {n} examples p={p:.3f} w={t.weight:g}"
                 for t, n, p in zip(self.tasks, self.sizes, self.probabilities, strict=True)]
        kind = "a head each" if self.task == "seq_cls" else "tagged prompts"
        return [f"multitask ({kind}): {'; '.join(parts)}; sampling={s.sampling}"
                + (f" T={s.temperature:g}" if s.sampling == "temperature" else "") + f" weighting={s.weighting}"]

    # --- training ----------------------------------------------------------------------------------------
    def task_of(self, index: int) -> int:
        """The task of a training example of the union."""
        return bisect.bisect_right([start for start, _ in self.spans], index) - 1

    def batches(self, batches: list[list[int]], epoch: int) -> list[dict[str, list[int]]]:
        """As many micro-batches as the run's own epoch, of its batch size, each from one drawn task."""
        size = max((len(b) for b in batches), default=1)
        plan = plan_epoch(self.sizes, self.probabilities, len(batches), size, self.seed, epoch)
        return [{"train": [self.spans[task][0] + i for i in idx]} for task, idx in plan]

    def task_logits(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        """The logits with every column outside ``task``'s classes at -inf: its own head's softmax."""
        start, end = self.offsets[task], self.offsets[task] + len(self.labels[task])
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[start:end] = True
        return logits.masked_fill(~keep, float("-inf"))

    def _mask_logits(self, module, args, output):
        if self.masked_task is None:
            return None
        return self.task_logits(output, self.masked_task)

    @contextmanager
    def only_task(self, task: int):
        """Forwards inside score only ``task``'s head (its classes' logits; the others at -inf)."""
        self.masked_task = task
        try:
            yield
        finally:
            self.masked_task = None

    def loss(self, model, batch, outputs, task_loss_sum, n_targets, step):
        task = self.task_of(batch["example_ids"][0])
        labels = batch["labels"]
        if self.task == "seq_cls":
            loss_sum = F.cross_entropy(self.task_logits(outputs.logits.float(), task), labels, reduction="sum")
            targets = labels.numel()
        else:
            loss_sum, targets = task_loss_sum, int((labels[:, 1:] != IGNORE).sum())
        self.window["loss"][task] += float(loss_sum.detach())
        self.window["targets"][task] += targets
        return self.weighting.term(task, loss_sum / n_targets, targets / n_targets)

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        """The window's mean loss per task (DWA's L_i(t)) and each task's weight for the next window."""
        means = {i: self.window["loss"][i] / self.window["targets"][i] for i in range(len(self.tasks))
                 if self.window["targets"][i]}
        self.weighting.window_done(means)
        self.window = self._zeros()
        row = {f"strategy/loss/{self.tasks[i].name}": m for i, m in means.items()}
        row.update({f"strategy/weight/{t.name}": w for t, w in zip(self.tasks, self.weighting.weights(), strict=True)})
        self.last = row
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"window": {k: list(v) for k, v in self.window.items()}, "last": dict(self.last),
                "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "window" in state:
            self.window = {k: list(v) for k, v in state["window"].items()}
        self.last = dict(state.get("last", {}))
        self.weighting.load_state_dict(state.get("weighting", {}))

    # --- eval and outputs --------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, examples: list[dict],
                 evaluate: Callable[[list[dict]], dict[str, float]]) -> dict[str, float]:
        """Each task's eval split with its own head, the macro average, and the totals over every example."""
        return self.score_tasks(examples, self.eval_spans, evaluate)

    def score_tasks(self, examples: list[dict], spans: list[tuple[int, int]],
                    evaluate: Callable[[list[dict]], dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        losses, accuracies, correct, n = [], [], 0.0, 0
        for i, (t, (start, end)) in enumerate(zip(self.tasks, spans, strict=True)):
            if end == start:
                continue
            with self.only_task(i):
                scores = evaluate(examples[start:end])
            for key in ("loss", "accuracy", "perplexity"):
                if f"eval/{key}" in scores:
                    out[f"eval/{t.name}/{key}"] = scores[f"eval/{key}"]
            out[f"eval/{t.name}/examples"] = end - start
            losses.append(scores["eval/loss"])
            if "eval/accuracy" in scores:
                accuracies.append(scores["eval/accuracy"])
                correct += scores["eval/accuracy"] * (end - start)
                n += end - start
        if not losses:
            return {}
        out["eval/loss"] = sum(losses) / len(losses)
        if accuracies:
            out["eval/macro_accuracy"] = sum(accuracies) / len(accuracies)
            out["eval/accuracy"] = correct / n
        out["eval/examples"] = sum(end - start for start, end in spans)
        return out

    def final_metrics(self, metrics: dict[str, Any], evaluate: Callable) -> dict[str, Any]:
        out = {f"strategy/examples/{t.name}": n for t, n in zip(self.tasks, self.sizes, strict=True)}
        out.update({f"strategy/probability/{t.name}": p for t, p in zip(self.tasks, self.probabilities, strict=True)})
        out.update({f"strategy/weight/{t.name}": w for t, w in zip(self.tasks, self.weighting.weights(), strict=True)})
        return out

    def save(self, model: nn.Module, run_dir: Path) -> None:
        """tasks.json (each task's classes, first class id and weight) and heads/<task>.safetensors."""
        from safetensors.torch import save_file

        run_dir = Path(run_dir)
        tasks = [{"name": t.name, "labels": labels, "offset": offset, "examples": n, "weight": w}
                 for t, labels, offset, n, w in zip(self.tasks, self.labels, self.offsets, self.sizes,
                                                    self.weighting.weights(), strict=True)]
        (run_dir / TASKS_FILE).write_text(json.dumps({"task": self.task, "tasks": tasks}, indent=2))
        if self.task != "seq_cls":
            return
        (run_dir / HEADS_DIR).mkdir(exist_ok=True)
        layer = self.head_layer
        for t in tasks:
            rows = slice(t["offset"], t["offset"] + len(t["labels"]))
            tensors = {"weight": layer.weight[rows]}
            if layer.bias is not None:
                tensors["bias"] = layer.bias[rows]
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                      str(run_dir / HEADS_DIR / f"{t['name']}.safetensors"))


def OmegaConf_missing(value: Any) -> bool:  # noqa: N802
    return value is None or str(value) == "???"


def parse_tasks(raw: list[Any]) -> list[Task]:
    """``strategy.tasks`` entries as Tasks; a bad entry is one FtuneError paragraph."""
    example = "{name: sst2, dataset: {path: sst2.csv, eval_path: sst2_dev.csv}, weight: 1.0}"
    tasks: list[Task] = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise FtuneError(f"strategy.tasks[{n}] is {entry!r}; each task is a mapping like {example}.")
        unknown = sorted(set(entry) - set(TASK_KEYS))
        if unknown:
            raise FtuneError(f"strategy.tasks[{n}] has unknown key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}; a task takes {', '.join(TASK_KEYS)} (dataset settings go inside "
                             f"its dataset: {example}).")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise FtuneError(f"strategy.tasks[{n}] needs a name of letters, digits, '_', '-' or '.' (got {name!r}): it "
                             f"names the task's metrics (eval/<name>/accuracy) and its head file, e.g. {example}.")
        if any(t.name == name for t in tasks):
            raise FtuneError(f"strategy.tasks names task '{name}' twice; each task needs its own name (it keys its "
                             f"metrics and head).")
        dataset = entry.get("dataset") or {}
        if not isinstance(dataset, dict):
            raise FtuneError(f"strategy.tasks: task '{name}' has dataset={dataset!r}; it must be a mapping of dataset "
                             f"keys, e.g. {example}.")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise FtuneError(f"strategy.tasks: task '{name}' has weight={weight!r}; a task's weight is a number >= 0 "
                             f"(1.0 by default).")
        tasks.append(Task(name, dict(dataset), float(weight)))
    return tasks


def evaluate_run(cfg: Any, run_cfg: Any, model: nn.Module, tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """``ftune eval run=<multitask run>``: each task's eval split scored with its own head (the classes of
    ``tasks.json``), as the run's final evaluation did; eval.json in the run (or ``out=``)."""
    import dataclasses

    from omegaconf import OmegaConf

    from ftune.config import validate_group
    from ftune.data import build_data
    from ftune.data.collate import Collator
    from ftune.evaluate import evaluate_examples
    from ftune.progress import console, metrics_table
    from ftune.runs import resolve_precision

    e = cfg.eval
    if cfg.get("dataset") is not None:
        raise FtuneError(f"Run '{cfg.run}' is a multi-task run: `ftune eval` scores each of its tasks on its own eval "
                         f"split, so it takes no dataset=. Drop the dataset override (or train a run on that data).")
    if e.split == "all" or e.scorer:
        raise FtuneError(f"Run '{cfg.run}' is a multi-task run, evaluated on each task's held-out split: "
                         f"eval.split=all and eval.scorer are not supported for it. Drop them.")
    strategy: Multitask = _build(run_cfg.strategy)
    saved = json.loads((Path(str(cfg.run)) / TASKS_FILE).read_text())["tasks"]
    strategy.saved_labels = {t["name"]: list(t["labels"]) for t in saved}
    data_cfg = validate_group(OmegaConf.create({"dataset": strategy.dataset_node(run_cfg.dataset)}), "dataset")
    max_length = e.max_length or int(run_cfg.trainer.max_length)
    seed = int(run_cfg.get("seed", cfg.seed))
    chat_template = run_cfg.model.get("chat_template")
    eval_cap = e.max_samples

    def build(c: DatasetConfig):
        return build_data(dataclasses.replace(c, max_eval_samples=eval_cap or c.max_eval_samples), tokenizer,
                          max_length, seed, chat_template)

    with console.status("Encoding the tasks' data"):
        data = strategy.data(build, data_cfg, tokenizer)
    if not data.eval:
        raise FtuneError(f"No task of run '{cfg.run}' has an eval split (eval_path, eval_split or eval_fraction in "
                         f"its dataset), so there is nothing to evaluate.")
    strategy.prepare(model, None)
    precision = e.precision if e.precision != "auto" else str(run_cfg.trainer.get("precision", "auto"))
    autocast_dtype = resolve_precision(precision, device)
    collator = Collator(tokenizer.pad_token_id, data.task)
    with console.status(f"Evaluating {len(data.eval)} examples"):
        metrics = strategy.evaluate(model, data.eval, lambda examples: evaluate_examples(
            model, examples, collator, data.task, device, int(e.batch_size), autocast_dtype))
    report = {**metrics, "source": f"run {cfg.run}", "method": str(run_cfg.method.name),
              "model": run_cfg.model.get("path") or run_cfg.model.name, "dataset": "multitask",
              "tasks": [t.name for t in strategy.tasks], "split": "eval", "task": data.task}
    console.print(f"[bold]ftune eval[/]  run {cfg.run}  method [cyan]{run_cfg.method.name}[/]  tasks "
                  f"[cyan]{', '.join(t.name for t in strategy.tasks)}[/]", soft_wrap=True)
    console.print(metrics_table(metrics, "multitask · eval"))
    out = Path(str(cfg.out)) if cfg.get("out") else Path(str(cfg.run))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    console.print(f"[bold green]wrote[/] {out / 'eval.json'}")
    return report


def _build(strategy_cfg: Any) -> Multitask:
    from ftune.strategies.base import build_strategy

    return build_strategy(strategy_cfg)
