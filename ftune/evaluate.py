"""Evaluation on encoded examples: accuracy for classification, loss and perplexity for causal LMs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftune.data.collate import Collator
from ftune.data.formats import IGNORE


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch and the number of targets it covers (tokens or examples).

    Returning a sum lets the trainer normalise by the targets of the whole accumulation window,
    so every token weighs the same however the sequences fall into micro-batches.
    """
    if task == "seq_cls":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    # Prompt-learning methods prepend virtual tokens: their logits are longer than the labels.
    logits = logits[:, -labels.shape[1]:]
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels: the trainer computes the loss itself."""
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate_examples(model: nn.Module, examples: list[dict], collator: Collator, task: str,
                      device: torch.device, batch_size: int, autocast_dtype: torch.dtype | None = None) -> dict:
    """Loss over ``examples`` and, for classification, accuracy. Keys are prefixed ``eval/``."""
    was_training = model.training
    model.eval()
    loss_sum, n_targets, correct = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    for start in range(0, len(order), batch_size):
        batch = collator([examples[i] for i in order[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**model_inputs(batch)).logits
        loss, n = task_loss(logits, batch["labels"], task)
        loss_sum += float(loss)
        n_targets += n
        if task == "seq_cls":
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    mean = loss_sum / max(n_targets, 1)
    metrics = {"eval/loss": mean}
    if task == "seq_cls":
        metrics["eval/accuracy"] = correct / max(n_targets, 1)
    else:
        metrics["eval/perplexity"] = math.exp(min(mean, 50.0))
    metrics["eval/examples"] = len(examples)
    return metrics
