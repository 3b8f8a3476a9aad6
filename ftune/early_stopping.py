"""The best evaluation of a run: trainer.metric_for_best, early_stopping_patience and keep_best.

Every evaluation during training (each ``trainer.eval_every`` steps, and the final one) is compared
with the best so far on ``trainer.metric_for_best``, in its direction (``trainer.greater_is_better``,
or inferred from the name: loss and perplexity lower, accuracy and scores higher). An evaluation
counts as better only when strictly better. After ``early_stopping_patience`` evaluations without
improvement the run stops, and ends as any run does (final eval, save, model card). With
``keep_best`` the trainable tensors of the best evaluation are kept on the CPU (what the method
saves: adapters, or every weight of a full fine-tune) and put back before the run is saved.

The best step, its value and the evaluations since are part of the loop state (checkpoint.LoopState)
and the best tensors are saved with each checkpoint, so a resumed run chooses as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ftune.checkpoint import Checkpoint, LoopState
from ftune.config import TrainerConfig
from ftune.errors import FtuneError
from ftune.evaluate import SCORERS

LOWER_IS_BETTER = ("loss", "perplexity")
HIGHER_IS_BETTER = ("accuracy", *SCORERS)


def best_metric_key(name: str) -> str:
    """``loss``, ``eval_loss`` and ``eval/loss`` all name ``eval/loss``."""
    name = name.strip()
    if name.startswith("eval/"):
        return name
    return "eval/" + (name[len("eval_"):] if name.startswith("eval_") else name)


def eval_metrics(task: str, scorer: str | None) -> list[str]:
    """The metrics an evaluation during training reports for ``task``."""
    names = ["eval/loss", "eval/accuracy"] if task == "seq_cls" else ["eval/loss", "eval/perplexity"]
    return names + ([f"eval/{scorer}"] if scorer and task != "seq_cls" else [])


def check_best_settings(t: TrainerConfig, task: str, has_eval: bool) -> None:
    """Refuse early stopping / keep_best settings that cannot work, before anything loads."""
    wanted = [k for k, on in (("trainer.early_stopping_patience", t.early_stopping_patience is not None),
                              ("trainer.keep_best", t.keep_best)) if on]
    key = best_metric_key(t.metric_for_best)
    known = eval_metrics(task, t.eval_scorer)
    if key not in known:
        hint = (f" ({key} is a score of generated answers: set trainer.eval_scorer={key[5:]} to compute it)"
                if key[5:] in SCORERS and task != "seq_cls" else "")
        raise FtuneError(
            f"Unknown trainer.metric_for_best '{t.metric_for_best}': this run's evaluations report "
            f"{', '.join(known)}{hint}. Choose one of them, e.g. trainer.metric_for_best={known[0]}."
        )
    if wanted and t.eval_every is None:
        raise FtuneError(
            f"{' and '.join(wanted)} compare the evaluations made every trainer.eval_every steps, and "
            f"trainer.eval_every is null (one evaluation at the end): set trainer.eval_every=<steps between "
            f"evaluations>, e.g. trainer.eval_every=50, or drop {' and '.join(wanted)}."
        )
    if wanted and not has_eval:
        raise FtuneError(
            f"{' and '.join(wanted)} compare evaluations on the eval split, and this dataset has none: set "
            f"dataset.eval_path=<file> or dataset.eval_fraction=0.1."
        )


def greater_is_better(t: TrainerConfig) -> bool:
    if t.greater_is_better is not None:
        return t.greater_is_better
    return best_metric_key(t.metric_for_best)[5:] in HIGHER_IS_BETTER


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable tensor (clone: on CPU, ``.cpu()`` would share the live storage)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


class BestEvaluation:
    """Which evaluation of the run is the best so far, and (keep_best) its trainable tensors."""

    def __init__(self, t: TrainerConfig):
        self.key = best_metric_key(t.metric_for_best)
        self.greater = greater_is_better(t)
        self.patience = t.early_stopping_patience
        self.keep = t.keep_best
        self.active = self.keep or self.patience is not None
        self.weights: dict[str, torch.Tensor] = {}
        self.weights_step: int | None = None

    @property
    def needs_scores(self) -> bool:
        """Whether evaluations during training must score generated answers (metric_for_best is a score)."""
        return self.key[5:] in SCORERS

    def update(self, loop: LoopState, metrics: dict[str, Any], model: torch.nn.Module) -> bool:
        """Count the evaluation of ``loop.step``; True if it is the best so far."""
        value = float(metrics[self.key])
        best = loop.best_value
        improved = math.isfinite(value) and (
            best is None or (value > best if self.greater else value < best))
        if improved:
            loop.best_step, loop.best_value, loop.evals_without_improvement = loop.step, value, 0
            if self.keep:
                self.weights, self.weights_step = trainable_snapshot(model), loop.step
        else:
            loop.evals_without_improvement += 1
        return improved

    def should_stop(self, loop: LoopState) -> bool:
        return self.patience is not None and loop.evals_without_improvement >= self.patience

    def to_save(self, loop: LoopState) -> dict[str, torch.Tensor] | None:
        """The best tensors for a checkpoint of ``loop.step`` (None when they are that step's own)."""
        if not self.keep or not self.weights or self.weights_step == loop.step:
            return None
        return self.weights

    def load(self, ckpt: Checkpoint) -> None:
        """Take the best tensors of a checkpoint being resumed."""
        step = ckpt.loop.best_step
        if not self.keep or step is None:
            return
        if ckpt.best is not None:
            self.weights, self.weights_step = ckpt.best, step
        elif step == ckpt.loop.step:  # the checkpoint's own weights are the best
            self.weights, self.weights_step = {n: t.clone() for n, t in ckpt.tensors.items()}, step

    def restore(self, model: torch.nn.Module) -> None:
        """Put the best tensors back into ``model``."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)

    def report(self, loop: LoopState, stopped_early: bool) -> dict[str, Any]:
        """The keys metrics.json gets: which evaluation was best, and where early stopping stopped."""
        if not self.active or loop.best_step is None:
            return {}
        out: dict[str, Any] = {"best_metric": self.key, "best_value": loop.best_value, "best_step": loop.best_step}
        if self.keep:
            out["weights_from_step"] = self.weights_step if self.weights else loop.step
        if stopped_early:
            out["stopped_early_at_step"] = loop.step
        return out
