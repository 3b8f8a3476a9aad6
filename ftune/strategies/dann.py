"""Domain-adversarial training (DANN; Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks"):
``strategy=dann``, for classification.

    ftune train dataset=classification dataset.path=source_train.csv dataset.eval_path=source_dev.csv \\
        strategy=dann strategy.target_path=target_unlabelled.csv strategy.target_eval_path=target_dev.csv

The run's dataset is the labelled source domain; ``strategy.target_path`` holds text of the target
domain without labels (the same format and columns, read with the same readers, tokenizer and
``trainer.max_length``). A domain classifier (an MLP: Linear(width, domain_hidden), ReLU,
Linear(domain_hidden, 2)) reads the pooled features - the input of the model's classification head:
BERT's pooled [CLS] output, a decoder's hidden state at the last non-padding token (the token the
head scores) - through a gradient reversal layer. Each micro-batch feeds a source batch (task loss,
domain label 0) and a target batch of as many examples (domain label 1; the ``"target"`` feed of
:meth:`DANN.batches`, shuffled per seed and epoch so a resumed run sees the same batches)::

    loss = task_sum / n  +  domain_weight * domain_sum / (2 n)

``n`` is the number of source examples of the accumulation window (so ``domain_sum / 2n`` is the mean
domain cross-entropy over its source and target examples). The domain classifier minimises the domain
loss; the gradient reversal layer passes ``-lambda_p`` times its gradient back into the features, so
the model learns features the domain classifier cannot tell apart, with

    lambda_p = 2 / (1 + exp(-gamma * p)) - 1,   p = steps done / total steps,   gamma = strategy.gamma (10)

rising from 0 (the classifier learns first) towards 1. ``strategy/domain_accuracy`` near 0.5 means
the two domains' features are aligned; stuck at 1.0, they are not (lambda too small or too late,
too few steps, or a domain gap the features cannot hide).

Methods: every method that keeps the model's classification head (full, freeze, bitfit, the LoRA
family, adapters, prompt methods: their virtual tokens are skipped when the last token is found).
The domain classifier is the strategy's own parameter group (``optimizer.lr``), checkpointed with
the strategy's state, and saved as ``<run>/domain_classifier.safetensors``; ``ftune eval`` loads the
task model as for any run. At the end ``strategy/target_accuracy`` scores the target domain's
labelled ``strategy.target_eval_path`` (``eval/*`` stays the source domain's eval split).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ftune.config import AT_LEAST_1, NOT_NEGATIVE, POSITIVE, ranged
from ftune.errors import FtuneError
from ftune.strategies.base import Strategy, StrategyContext, StrategySettings, file_identity, register_strategy

CLASSIFIER_FILE = "domain_classifier.safetensors"
SOURCE, TARGET = 0, 1  # domain labels


@dataclass
class DannSettings(StrategySettings):
    name: str = "dann"
    target_path: Optional[str] = None  # the target domain's unlabelled text (the dataset's format and columns)
    target_eval_path: Optional[str] = None  # the target domain's labelled eval file: strategy/target_accuracy
    gamma: float = ranged(10.0, POSITIVE)  # lambda_p = 2 / (1 + exp(-gamma * p)) - 1
    domain_weight: float = ranged(1.0, NOT_NEGATIVE)  # weight of the domain loss beside the task loss
    domain_hidden: int = ranged(256, AT_LEAST_1)  # width of the domain classifier's hidden layer


# --- gradient reversal and its schedule (tested against hand computations) ---------------------------
def lambda_schedule(p: float, gamma: float = 10.0) -> float:
    """DANN's ``lambda_p = 2 / (1 + exp(-gamma * p)) - 1`` at training progress ``p`` in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return GradientReversal.apply(x, scale)


def domain_classifier(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 2))


# --- the pooled features: the classification head's input --------------------------------------------
def classification_head(model: nn.Module) -> nn.Module | None:
    """The outermost module named like a classification head (classifier, score): under peft its
    wrapper, whose input is what the trained head reads."""
    from ftune.models import TASK_HEADS

    found = [(name.count("."), name) for name, _ in model.named_modules() if name.rpartition(".")[2] in TASK_HEADS]
    return model.get_submodule(min(found)[1]) if found else None


def pooled_features(head_input: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None,
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``batch x width`` features from the head's input: as they are when already pooled (BERT's
    pooler output), else the hidden state at the token a decoder's head scores: the last token that is
    not the pad token (transformers' rule), or, behind the virtual tokens a prompt method prepends,
    the last attended position (ftune.methods.prompts.pool_by_attention_mask's rule)."""
    if head_input.dim() == 2:
        return head_input
    offset = head_input.shape[1] - input_ids.shape[1]
    prompted = offset > 0 and attention_mask is not None
    real = attention_mask.bool() if prompted or pad_token_id is None else input_ids != pad_token_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * real).argmax(-1) + offset
    return head_input[torch.arange(head_input.shape[0], device=head_input.device), last]


class HeadInput:
    """Keeps the input of the classification head from the latest forward (autograd graph included)."""

    def __init__(self, head: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise FtuneError("strategy=dann: the model's classification head was not called in the forward pass, "
                             "so there are no pooled features for the domain classifier.")
        return value


@register_strategy("dann")
class DANN(Strategy):
    settings_cls = DannSettings

    def __init__(self, settings: DannSettings):
        super().__init__(settings)
        self.target: list[dict] = []
        self.target_eval: list[dict] = []
        self.classifier: nn.Module | None = None
        self.capture: HeadInput | None = None
        self.total_steps, self.seed = 1, 0
        self.lam = 0.0
        self.window = self._zeros()  # sums of the logging window not yet logged
        self.total = self._zeros()  # sums over the run
        self.last: dict[str, float] = {}  # the latest logged row's strategy/ values

    @staticmethod
    def _zeros() -> dict[str, float]:
        return {"domain": 0.0, "correct": 0, "examples": 0, "task": 0.0, "sources": 0}

    def identity(self) -> dict[str, Any]:
        """The target domain and the settings of its loss (not target_eval_path: it is only evaluated)."""
        s = self.settings
        return {"target_path": file_identity(s.target_path), "gamma": s.gamma, "domain_weight": s.domain_weight,
                "domain_hidden": s.domain_hidden}

    def check(self) -> None:
        s = self.settings
        if s.target_path is None or str(s.target_path) in ("", "???"):
            raise FtuneError(
                "strategy=dann needs the target domain's text: set strategy.target_path=<a file of the target "
                "domain's examples, labels not needed> (the run's dataset is the labelled source domain), and "
                "strategy.target_eval_path=<the target domain's labelled eval file> to score the result on it."
            )
        for key in ("target_path", "target_eval_path"):
            path = getattr(s, key)
            if path is not None and _looks_local(str(path)) and not Path(str(path)).expanduser().exists():
                raise FtuneError(
                    f"strategy.{key}={path} does not exist. Pass the path of the target domain's "
                    f"{'unlabelled text' if key == 'target_path' else 'labelled eval file'} (a json, jsonl, csv, tsv, "
                    f"parquet or txt file with the run's dataset columns)."
                )

    # --- building ------------------------------------------------------------------------------------
    def load(self, sctx: StrategyContext) -> None:
        from ftune.data import build_data
        from ftune.data.formats import encode_classification
        from ftune.data.loading import read_rows

        if sctx.task != "seq_cls":
            raise FtuneError(
                "strategy=dann trains a domain classifier on a classifier's pooled features and needs a classification "
                f"dataset (dataset.format=classification), but dataset '{sctx.dataset.name}' is a "
                f"{sctx.dataset.format} dataset for a causal LM. For a causal LM, adapt to a domain with "
                f"continued pretraining on its text instead (strategy=domain_adapt strategy.corpus_path=<text file>)."
            )
        s, d = self.settings, sctx.dataset
        table = read_rows(str(s.target_path), d.subset, d.split, d.encoding, d.delimiter)
        if table.bad:
            raise FtuneError(f"strategy.target_path: {table.where(table.bad[0])} cannot be read: {table.bad[0].reason}. "
                             f"Fix the file.")
        self.target, _ = encode_classification(table.rows, d, sctx.tokenizer, sctx.max_length, None,
                                               str(s.target_path)) if table.rows else ([], None)
        if not self.target:
            raise FtuneError(f"strategy.target_path={s.target_path} holds no text to train on (no row with a "
                             f"non-empty '{d.text_column}' column). Pass the target domain's examples.")
        if s.target_eval_path is not None:
            target_cfg = replace(d, path=str(s.target_eval_path), eval_path=None, eval_split=None, eval_fraction=None,
                                 max_samples=d.max_eval_samples, max_eval_samples=None, label_names=sctx.label_names)
            self.target_eval = build_data(target_cfg, sctx.tokenizer, sctx.max_length, sctx.seed).train
        self.seed, self.tokenizer = sctx.seed, sctx.tokenizer
        self.device, self.autocast_dtype = sctx.device, sctx.autocast_dtype

    def prepare(self, model: nn.Module, ctx: Any) -> None:
        head = classification_head(model)
        if head is None:
            raise FtuneError(
                "strategy=dann reads the pooled features at the input of the model's classification head (a module "
                "named classifier or score), and this model has none after the method was applied. Use a "
                "sequence-classification model (BERT-style or a decoder with a score head) with a method that keeps it."
            )
        width = next((m.in_features for m in head.modules() if isinstance(m, nn.Linear)), model.config.hidden_size)
        self.capture = HeadInput(head)
        self.model = model  # scored on the target domain at the end
        self.pad_token_id = getattr(model.config, "pad_token_id", None)
        self.total_steps = ctx.total_steps
        self.classifier = domain_classifier(width, self.settings.domain_hidden).to(ctx.device)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.classifier.parameters()), "lr": lr}]

    def header_lines(self) -> list[str]:
        s = self.settings
        return [f"dann: target {s.target_path} ({len(self.target)} examples, unlabelled)"
                + (f", scored on {s.target_eval_path} ({len(self.target_eval)} examples)" if self.target_eval else "")
                + f"; domain classifier {sum(p.numel() for p in self.classifier.parameters()):,} parameters; "
                  f"gamma={s.gamma} domain_weight={s.domain_weight}"]

    # --- training ------------------------------------------------------------------------------------
    def batches(self, batches: list[list[int]], epoch: int) -> list[dict[str, list[int]]]:
        """Each source batch with as many target examples: the target set shuffled per (seed, epoch),
        reshuffled whenever it runs out."""
        rng = random.Random(f"dann-target-{self.seed}-{epoch}")
        needed, order = sum(len(b) for b in batches), []
        while len(order) < needed:
            shuffled = list(range(len(self.target)))
            rng.shuffle(shuffled)
            order += shuffled
        out, at = [], 0
        for b in batches:
            out.append({"train": b, "target": order[at:at + len(b)]})
            at += len(b)
        return out

    def examples(self, feed: str) -> list[dict]:
        if feed != "target":
            return super().examples(feed)
        return self.target

    def loss(self, model, batch, outputs, task_loss_sum, n_targets, step):
        from ftune.evaluate import model_inputs

        source = self._features(batch)
        if not source.requires_grad:
            raise FtuneError(
                "strategy=dann: this method trains nothing below the classification head, so the domain classifier's "
                "reversed gradient cannot change the features it reads and DANN would only train the head. Use a "
                "method that trains the encoder's layers too (full, lora, freeze with method.trainable_layers >= 1, ...)."
            )
        target_batch = batch["feeds"]["target"]
        model(**model_inputs(target_batch))  # only the head's input is used: the target has no labels
        target = self._features(target_batch)
        features = torch.cat([source, target])
        domains = torch.cat([torch.full((len(source),), SOURCE), torch.full((len(target),), TARGET)]).to(features.device)
        self.lam = lambda_schedule(step / self.total_steps, self.settings.gamma)
        logits = self.classifier(reverse_gradient(features, self.lam)).float()
        domain_sum = F.cross_entropy(logits, domains, reduction="sum")
        loss = (task_loss_sum + self.settings.domain_weight * domain_sum / 2) / n_targets
        terms = {"domain": float(domain_sum.detach()), "correct": int((logits.argmax(-1) == domains).sum()),
                 "examples": len(domains), "task": float(task_loss_sum.detach()), "sources": len(source)}
        for sums in (self.window, self.total):
            for key, value in terms.items():
                sums[key] += value
        return loss

    def _features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled_features(self.capture.take(), batch["input_ids"], self.pad_token_id,
                               batch.get("attention_mask"))

    def row_metrics(self, steps_done: int) -> dict[str, Any]:
        row = self._means(self.window)
        if row:
            row["strategy/lambda"] = self.lam
            self.last = row
        self.window = self._zeros()
        return row

    @staticmethod
    def _means(sums: dict[str, float]) -> dict[str, float]:
        if not sums["examples"]:
            return {}
        return {"strategy/domain_loss": sums["domain"] / sums["examples"],
                "strategy/domain_accuracy": sums["correct"] / sums["examples"],
                "strategy/task_loss": sums["task"] / sums["sources"]}

    def state_dict(self) -> dict[str, Any]:
        return {"window": dict(self.window), "total": dict(self.total), "last": dict(self.last), "lambda": self.lam,
                "classifier": self.classifier.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = {**self._zeros(), **state.get("window", {})}
        self.total = {**self._zeros(), **state.get("total", {})}
        self.last, self.lam = dict(state.get("last", {})), state.get("lambda", 0.0)
        if "classifier" in state:
            self.classifier.load_state_dict(state["classifier"])

    # --- outputs -------------------------------------------------------------------------------------
    def final_metrics(self, metrics: dict[str, Any], evaluate: Callable) -> dict[str, Any]:
        """The last logged window's domain loss, accuracy and lambda (the end of training), the run's
        mean domain accuracy, and the scores on the target domain's labelled eval file."""
        from ftune.data.collate import Collator
        from ftune.evaluate import evaluate_examples

        out = dict(self.last)
        run = self._means(self.total)
        if run:
            out["strategy/domain_accuracy_mean"] = run["strategy/domain_accuracy"]
        if self.target_eval:
            scores = evaluate_examples(self.model, self.target_eval, Collator(self.tokenizer.pad_token_id, "seq_cls"),
                                       "seq_cls", self.device, 32, self.autocast_dtype)
            out["strategy/target_loss"] = scores["eval/loss"]
            out["strategy/target_accuracy"] = scores["eval/accuracy"]
        return out

    def save(self, model: nn.Module, run_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()},
                  str(Path(run_dir) / CLASSIFIER_FILE))


def _looks_local(path: str) -> bool:
    from ftune.data.loading import looks_local

    return looks_local(path)
