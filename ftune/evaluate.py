"""Evaluation: the training loop's eval (loss, accuracy, perplexity) and the `ftune eval` command.

The training loop calls :func:`task_loss`, :func:`model_inputs` and :func:`evaluate_examples`.
``ftune eval`` adds, on top of the same encoded examples and the same prompt masking as training:

- classification: accuracy, macro-F1, per-class counts and the confusion matrix (``confusion.png``);
- causal LM: loss and perplexity = exp(mean loss per target token); with ``eval.scorer`` also
  batched greedy generation (left padding) and exact match of the extracted answers.

Results go to ``eval.json`` in the run directory (or ``out=``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftune.data.collate import Collator
from ftune.data.formats import IGNORE
from ftune.errors import FtuneError


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch and the number of targets it covers (tokens or examples).

    Returning a sum lets the trainer normalise by the targets of the whole accumulation window,
    so every token weighs the same however the sequences fall into micro-batches.
    """
    if task == "seq_cls":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    if task == "masked_lm":  # each target position predicts its own (masked) token: no shift
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())
    # Shift the labels, not the logits: position t is scored against label t+1, the last position
    # against nothing. Slicing the (batch, length, vocab) logits instead would copy them (hundreds of MB
    # for a 49k vocabulary), and backward would make two more buffers of that size.
    # Prompt-learning methods prepend virtual tokens: their logits are longer than the labels; those
    # positions get no target either.
    virtual = logits.shape[1] - labels.shape[1]
    targets = F.pad(labels[:, 1:], (virtual, 1), value=IGNORE)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


# Models whose logits are exactly ``lm_head(hidden)``: no soft-capping (Gemma 2), scaling (Cohere,
# Granite) or other step after the output layer, so the chunked loss below may stand in for it.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo2", "smollm3", "gpt_neox"})


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, never holding more
    than ``chunk`` rows of logits.

    The usual way keeps a ``(targets, vocab)`` tensor of logits, its log-softmax (saved for backward)
    and, in backward, gradients of the same size: for a 49k vocabulary and a thousand targets, about
    200 MB each. Here each chunk of rows is projected, scored and turned into its gradient
    (``softmax - onehot``) at once, in forward; only the gradients of the inputs (``hidden``'s size, and
    the head's when it trains) are kept, and backward scales them by the incoming gradient. Same FLOPs
    as the plain loss, none recomputed (the approach of Liger-Kernel's fused linear cross-entropy).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: D102 (see the class)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w_mm = None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            raw = F.linear(h, weight, bias)  # the dtype the output layer would compute in (autocast: bf16/fp16)
            logits = raw.float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(y), device=y.device), y] -= 1.0
            if need_h:
                if w_mm is None:
                    w_mm = weight.to(raw.dtype)
                grad_h[start:start + chunk] = (grad.to(raw.dtype) @ w_mm).to(hidden.dtype)
            if need_w:
                grad_w += grad.T @ h.float()
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(b_dtype), None, None)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of :class:`ChunkedCrossEntropy`: about 16M logits (64 MB in fp32)."""
    return max(64, (1 << 24) // max(vocab, 1))


class TargetLogits:
    """A causal LM's output layer computes logits only at the positions that have a target.

    Prompt tokens (masked), padding and each sequence's last position are never scored, yet a plain
    forward projects every one of them onto the vocabulary: on instruction data that is most of the
    positions, and for a 49k vocabulary the logits and their gradient are the largest tensors of a
    step. A forward pre-hook on the output layer keeps only the hidden states of scored positions,
    so ``outputs.logits`` is ``(1, targets, vocab)`` in target order; :meth:`loss` scores it.
    Outside :meth:`targets` (generation, merge checks) the hook passes everything through.

    ``chunked`` (``trainer.chunked_loss``, for runs whose strategy does not read the logits): the
    output layer projects nothing (``outputs.logits`` is ``(1, 0, vocab)``) and the loss comes from
    :class:`ChunkedCrossEntropy` on the kept hidden states, never holding the whole logits tensor.
    It applies to a plain ``nn.Linear`` head (not one a method wraps, e.g. LoRA on ``lm_head``, nor
    an FSDP-sharded one) of a model in :data:`PLAIN_HEAD_MODELS`; otherwise the plain path runs.
    """

    def __init__(self, model: nn.Module, chunked: bool = False):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.active = isinstance(head, nn.Module)
        self.head = head if self.active else None
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.chunked = bool(chunked and self.active and type(head) is nn.Linear and model_type in PLAIN_HEAD_MODELS)
        self._fuse = False
        self._labels: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._select) if self.active else None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle, self.active = None, False

    def _select(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._labels is None:
            return None
        hidden, labels = args[0], self._labels
        virtual = hidden.shape[1] - labels.shape[1]  # prompt-learning methods prepend virtual tokens
        targets = F.pad(labels[:, 1:], (virtual, 1), value=IGNORE)  # position t is scored against label t+1
        keep = targets != IGNORE
        self._targets = targets[keep]
        kept = hidden[keep]
        if self._fuse:  # scored in forward() in chunks; the layer itself projects no row
            self._hidden = kept
            return (kept[:0].unsqueeze(0), *args[1:])
        return (kept.unsqueeze(0), *args[1:])

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[Any, torch.Tensor, int]:
        """(model outputs, summed task loss, targets) for ``batch``; see :func:`task_loss`."""
        if task != "causal_lm" or not self.active:
            outputs = model(**model_inputs(batch))
            return outputs, *task_loss(outputs.logits, batch["labels"], task)
        self._labels, self._targets, self._hidden = batch["labels"], None, None
        # a sharded (FSDP) head is whole only inside the model's forward: the plain path then
        self._fuse = self.chunked and type(self.head.weight) is nn.Parameter
        try:
            outputs = model(**model_inputs(batch))
        finally:
            self._labels = None
        targets, hidden, self._targets, self._hidden = self._targets, self._hidden, None, None
        if targets is None:  # the model never called its output layer as a module: score every position
            return outputs, *task_loss(outputs.logits, batch["labels"], task)
        if hidden is not None:
            head = self.head
            loss = ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_rows(head.out_features))
            return outputs, loss, int(targets.numel())
        logits = outputs.logits[0]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        return outputs, loss, int(targets.numel())


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The batch without labels (nor a strategy's other feeds, nor the example indices): the trainer computes
    the loss itself.

    A packed row (position ids, no attention mask) also gets ``use_cache=False``: with a cache,
    transformers builds a causal mask over the whole row and its examples would see each other.
    """
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k not in ("labels", "feeds", "example_ids")}
    if "position_ids" in batch and "attention_mask" not in batch:
        inputs["use_cache"] = False
    return inputs


def _batched_logits(model: nn.Module, examples: list[dict], collator: Collator, device: torch.device,
                    batch_size: int, autocast_dtype: torch.dtype | None):
    """(indices, batch, logits) over ``examples``, shortest first (less padding), in eval mode."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collator([examples[i] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**model_inputs(batch)).logits
        yield idx, batch, logits


@torch.no_grad()
def evaluate_examples(model: nn.Module, examples: list[dict], collator: Collator, task: str,
                      device: torch.device, batch_size: int, autocast_dtype: torch.dtype | None = None,
                      target_logits: TargetLogits | None = None,
                      reduce: Callable[[list[float]], list[float]] | None = None,
                      batches: tuple[int, dict] | None = None) -> dict:
    """Loss over ``examples`` and, for classification, accuracy. Keys are prefixed ``eval/``.

    ``target_logits``: the training run's hook on the output layer (a temporary one otherwise).
    ``reduce``: sums (loss, targets, correct, examples) over processes, each of which scored its shard.
    ``batches``: (n, example): FSDP2, where a forward is a collective, runs n forwards on every process;
    those beyond the shard's own batches forward ``example`` and are not counted."""
    was_training = model.training
    model.eval()
    loss_sum, n_targets, correct = 0.0, 0, 0
    own = target_logits is None
    scorer = TargetLogits(model) if own else target_logits
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    try:
        for start in range(0, len(order), batch_size):
            batch = collator([examples[i] for i in order[start:start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                outputs, loss, n = scorer.forward(model, batch, task)
            loss_sum += float(loss)
            n_targets += n
            if task == "seq_cls":
                correct += int((outputs.logits.argmax(-1) == batch["labels"]).sum())
        n_batches, filler = batches or (0, None)
        for _ in range(n_batches - math.ceil(len(order) / batch_size)):
            batch = {k: v.to(device) for k, v in collator([filler]).items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                scorer.forward(model, batch, task)
    finally:
        if own:
            scorer.remove()
    model.train(was_training)
    n_examples = len(examples)
    if reduce is not None:
        loss_sum, n_targets, correct, n_examples = reduce([loss_sum, n_targets, correct, n_examples])
        n_targets, correct, n_examples = int(n_targets), int(correct), int(n_examples)
    mean = loss_sum / max(n_targets, 1)
    metrics = {"eval/loss": mean}
    if task == "seq_cls":
        metrics["eval/accuracy"] = correct / max(n_targets, 1)
    else:
        metrics["eval/perplexity"] = math.exp(min(mean, 50.0))
    metrics["eval/examples"] = n_examples
    return metrics


# --- classification -----------------------------------------------------------------------------
@torch.no_grad()
def predict_classes(model: nn.Module, examples: list[dict], collator: Collator, device: torch.device,
                    batch_size: int, autocast_dtype: torch.dtype | None = None) -> tuple[list[int], list[int], float]:
    """(predicted class ids, true class ids, mean loss) over ``examples``, in their order."""
    was_training = model.training
    model.eval()
    preds, labels = [0] * len(examples), [0] * len(examples)
    loss_sum = 0.0
    for idx, batch, logits in _batched_logits(model, examples, collator, device, batch_size, autocast_dtype):
        loss, _ = task_loss(logits, batch["labels"], "seq_cls")
        loss_sum += float(loss)
        for i, p, y in zip(idx, logits.argmax(-1).tolist(), batch["labels"].tolist(), strict=True):
            preds[i], labels[i] = p, y
    model.train(was_training)
    return preds, labels, loss_sum / max(len(examples), 1)


def classification_metrics(preds: list[int], labels: list[int], label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class counts and the confusion matrix (rows: true class, columns: predicted).

    A class's F1 is 0 when it has neither support nor predictions' overlap (precision or recall
    undefined counts as 0, as scikit-learn's ``zero_division=0``); macro-F1 averages over every class.
    """
    k = len(label_names)
    confusion = [[0] * k for _ in range(k)]
    for p, y in zip(preds, labels, strict=True):
        confusion[y][p] += 1
    per_class: dict[str, dict[str, Any]] = {}
    f1s = []
    for c, name in enumerate(label_names):
        tp = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(confusion[r][c] for r in range(k))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        per_class[name] = {"support": support, "predicted": predicted, "correct": tp,
                           "precision": precision, "recall": recall, "f1": f1}
    n = len(labels)
    return {
        "eval/accuracy": sum(confusion[c][c] for c in range(k)) / n if n else 0.0,
        "eval/macro_f1": sum(f1s) / k if k else 0.0,
        "per_class": per_class,
        "confusion": {"labels": list(label_names), "matrix": confusion},
    }


def plot_confusion(confusion: list[list[int]], label_names: list[str], out: Path, title: str) -> None:
    """confusion.png: counts, true class down the rows, predicted class across the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(label_names)
    size = min(12.0, 2.5 + 0.6 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), label_names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in confusion), default=0)
    for r in range(k):
        for c in range(k):
            ax.text(c, r, str(confusion[r][c]), ha="center", va="center",
                    color="white" if peak and confusion[r][c] > peak / 2 else "black", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- generation scoring -------------------------------------------------------------------------
SCORERS = ("exact_match", "gsm8k")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _normalize_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str, scorer: str) -> str:
    """The part of a completion (or reference) that ``scorer`` compares.

    exact_match: the whole text, whitespace collapsed, lower-cased, trailing period dropped.
    gsm8k: the number after ``####`` (GSM8K's answer line), else the last number in the text;
    commas, ``$`` and a trailing period are dropped and ``72.0`` reads as ``72``.
    """
    if scorer == "gsm8k":
        marked = re.search(r"####\s*([^\n]*)", text)
        if marked:
            numbers = _NUMBER.findall(marked.group(1))
            return _normalize_number(numbers[0]) if numbers else marked.group(1).strip()
        numbers = _NUMBER.findall(text)
        return _normalize_number(numbers[-1]) if numbers else ""
    if scorer == "exact_match":
        return " ".join(text.split()).lower().rstrip(".").strip()
    raise FtuneError(f"Unknown eval.scorer '{scorer}'; choose one of {', '.join(SCORERS)} (or null for none).")


def score_answers(predictions: list[str], references: list[str], scorer: str) -> list[bool]:
    return [extract_answer(p, scorer) == extract_answer(r, scorer) for p, r in zip(predictions, references, strict=True)]


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]] | None:
    """Split an encoded causal-LM example at its first target token: (prompt ids, first answer's ids)."""
    labels = example["labels"]
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
    if first is None or first == 0:
        return None
    end = first
    while end < len(labels) and labels[end] != IGNORE:
        end += 1
    return list(example["input_ids"][:first]), list(example["input_ids"][first:end])


# --- the `ftune eval` command -------------------------------------------------------------------
def _same_data(a, b) -> bool:
    return (a.path, a.subset, a.split, a.format) == (b.path, b.subset, b.split, b.format)


def has_eval_split(d) -> bool:
    """Whether a dataset config defines a held-out split (eval_path, eval_split or eval_fraction)."""
    return bool(d.eval_path or d.eval_split or d.eval_fraction)


def eval_examples(data_cfg, tokenizer, max_length: int, seed: int, chat_template: str | None, split: str,
                  max_samples: int | None):
    """(examples, label_names, description of the split) for ``split`` in eval | all."""
    from ftune.data import build_data

    if split == "all":
        cfg = replace(data_cfg, eval_path=None, eval_split=None, eval_fraction=None,
                      max_samples=max_samples or data_cfg.max_eval_samples)
        bundle = build_data(cfg, tokenizer, max_length, seed, chat_template)
        return bundle.train, bundle.label_names, f"all rows of {data_cfg.path} ({data_cfg.split})"
    if not has_eval_split(data_cfg):
        raise FtuneError(
            f"Dataset '{data_cfg.name}' defines no held-out split (no eval_path, eval_split or eval_fraction). "
            f"Evaluate every row with eval.split=all, or set dataset.eval_path=<file>."
        )
    cfg = replace(data_cfg, max_eval_samples=max_samples or data_cfg.max_eval_samples)
    bundle = build_data(cfg, tokenizer, max_length, seed, chat_template)
    if data_cfg.eval_path:
        where = data_cfg.eval_path
    elif data_cfg.eval_split:
        where = f"{data_cfg.path} ({data_cfg.eval_split})"
    else:
        where = f"{data_cfg.path} (held-out {data_cfg.eval_fraction:g}, seed {seed})"
    return bundle.eval, bundle.label_names, where


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_eval(cfg) -> dict[str, Any]:
    """The `ftune eval` command: evaluate a run (run=) or a base model (model=) on a dataset."""
    from omegaconf import OmegaConf

    from ftune.config import validate_group
    from ftune.data import task_of
    from ftune.methods.base import trainable_parameters
    from ftune.models import build_model, load_tokenizer, model_label
    from ftune.progress import console, metrics_table
    from ftune.runs import (
        base_model_config,
        check_run_dir,
        load_run,
        resolve_device,
        resolve_precision,
        run_config,
    )

    if (cfg.get("harness") or {}).get("tasks"):  # lm-evaluation-harness tasks instead of ftune's own eval
        from ftune.harness import run_harness

        return run_harness(cfg)
    e = cfg.eval
    if e.split not in ("auto", "eval", "all"):
        raise FtuneError(f"eval.split must be auto, eval or all (got '{e.split}').")
    if e.scorer is not None and e.scorer not in SCORERS:
        raise FtuneError(f"Unknown eval.scorer '{e.scorer}'; choose one of {', '.join(SCORERS)} (or null for none).")
    device = resolve_device(str(cfg.device))
    model_override = validate_group(cfg, "model") if cfg.get("model") is not None else None
    data_override = validate_group(cfg, "dataset") if cfg.get("dataset") is not None else None

    if cfg.get("run") and (run_config(check_run_dir(cfg.run)).get("strategy") or {}).get("name") == "multitask":
        from ftune.strategies.multitask import evaluate_run

        loaded = load_run(cfg.run, device, model_cfg=model_override)  # each task scored with its own head
        return evaluate_run(cfg, loaded.cfg, loaded.model, loaded.tokenizer, device)
    if cfg.get("run"):
        run_data = validate_group(run_config(check_run_dir(cfg.run)), "dataset")
        data_cfg = data_override or run_data
        if task_of(data_cfg) != task_of(run_data):  # said before any model is loaded
            raise FtuneError(
                f"Run '{cfg.run}' is a {task_of(run_data)} run but dataset '{data_cfg.name}' is a "
                f"{task_of(data_cfg)} dataset; evaluate it on data of its own kind."
            )
        loaded = load_run(cfg.run, device, model_cfg=model_override)
        model, tokenizer, method, run_cfg, run_task, label_names = loaded
        model_cfg = model_override or validate_group(run_cfg, "model")
        seed = int(run_cfg.get("seed", cfg.seed))
        max_length = e.max_length or int(run_cfg.trainer.max_length)
        precision = e.precision if e.precision != "auto" else str(run_cfg.trainer.get("precision", "auto"))
        if run_task == "seq_cls":  # the class ids must mean what they meant in training
            data_cfg = replace(data_cfg, label_names=list(label_names))
        split = e.split
        if split == "auto":
            foreign = data_override is not None and not _same_data(data_override, run_data)
            split = "all" if foreign and not (data_cfg.eval_path or data_cfg.eval_split) else (
                "eval" if has_eval_split(data_cfg) else "all")
        method_name = method.name
        if model_override is not None:
            console.print(f"[yellow]note[/] base model '{model_override.path or model_override.name}' instead of the "
                          f"run's own '{run_cfg.model.get('path') or run_cfg.model.name}'")
        out = Path(str(cfg.out)) if cfg.get("out") else Path(str(cfg.run))
        source = f"run {cfg.run}"
    elif model_override is not None:
        if data_override is None:
            raise FtuneError("Evaluating a base model needs a dataset: add dataset=<config name>, e.g. dataset=sentiment.")
        model_cfg = base_model_config(model_override)
        data_cfg, seed = data_override, int(cfg.seed)
        max_length = e.max_length or 512
        precision = e.precision
        run_cfg, method_name = None, "base"
        split = e.split if e.split != "auto" else ("eval" if has_eval_split(data_cfg) else "all")
        tokenizer = load_tokenizer(model_cfg)
        label_names = None
        out = Path(str(cfg.out)) if cfg.get("out") else None
        source = f"model {model_label(model_cfg)}"
    else:
        raise FtuneError(
            "Nothing to evaluate: pass run=<a run directory> (e.g. `ftune eval run=runs/x`), or model=<model config> "
            "with dataset=<dataset config> to evaluate a base model."
        )

    task = task_of(data_cfg)
    with console.status(f"Encoding {data_cfg.name}"):
        examples, data_labels, where = eval_examples(data_cfg, tokenizer, max_length, seed, model_cfg.chat_template,
                                                     split, e.max_samples)
    if not examples:
        raise FtuneError(f"No example to evaluate in {where}; check the dataset (or use eval.split=all).")
    if run_cfg is None:  # a base model: built now that the classes are known
        label_names = data_labels
        with console.status(f"Loading model {model_label(model_cfg)}"):
            model = build_model(model_cfg, task, num_labels=len(label_names) or None, label_names=label_names,
                                pad_token_id=tokenizer.pad_token_id)
        model.to(device).eval()
    autocast_dtype = resolve_precision(precision, device)
    collator = Collator(tokenizer.pad_token_id, task)
    batch_size = int(e.batch_size)
    title = f"{source} · {data_cfg.name} · {where}"

    metrics: dict[str, Any] = {}
    extra_files: list[str] = []
    with console.status(f"Evaluating {len(examples)} examples"):
        if task == "seq_cls":
            preds, labels, loss = predict_classes(model, examples, collator, device, batch_size, autocast_dtype)
            metrics["eval/loss"] = loss
            cls = classification_metrics(preds, labels, label_names)
            metrics.update(cls)
        else:
            metrics.update(evaluate_examples(model, examples, collator, task, device, batch_size, autocast_dtype))
    metrics["eval/examples"] = len(examples)
    samples = None
    if task == "causal_lm" and e.scorer:
        samples = score_generations(model, tokenizer, data_cfg, max_length, seed, model_cfg.chat_template, split,
                                    e, device, metrics)
    trainable, total = trainable_parameters(model)
    if run_cfg is not None and (Path(str(cfg.run)) / "metrics.json").exists():
        # a loaded adapter is frozen (nothing requires grad): what the run trained is in its metrics.json
        trained = json.loads((Path(str(cfg.run)) / "metrics.json").read_text())
        trainable, total = int(trained.get("trainable_params", trainable)), int(trained.get("total_params", total))

    report: dict[str, Any] = {
        **metrics,
        "source": source, "method": method_name, "model": model_cfg.path or model_cfg.name,
        "dataset": data_cfg.name, "data": where, "split": split, "task": task,
        "trainable_params": trainable if run_cfg is not None else 0, "total_params": total,
        "trainable_percent": 100.0 * trainable / total if run_cfg is not None and total else 0.0,
    }
    console.print(f"[bold]ftune eval[/]  {source}  method [cyan]{method_name}[/]  data [cyan]{where}[/]", soft_wrap=True)
    console.print(metrics_table(_scalars(metrics), f"{data_cfg.name} · {split}"))
    if task == "seq_cls":
        console.print(_confusion_table(metrics["confusion"]["matrix"], label_names))
    if samples:
        report["samples"] = samples[:20]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if task == "seq_cls":
            plot_confusion(metrics["confusion"]["matrix"], label_names, out / "confusion.png", title)
            extra_files.append("confusion.png")
        if samples:
            with (out / "eval_predictions.jsonl").open("w") as f:
                for s in samples:
                    f.write(json.dumps(s) + "\n")
            extra_files.append("eval_predictions.jsonl")
        (out / "eval.json").write_text(json.dumps(_keep_harness(out / "eval.json", report), indent=2))
        if run_cfg is None and not (out / "config.yaml").exists():  # so `ftune compare` lists the baseline
            base = {"model": OmegaConf.to_container(OmegaConf.structured(model_cfg)),
                    "dataset": OmegaConf.to_container(OmegaConf.structured(data_cfg)),
                    "method": {"name": "base"}, "seed": seed}
            (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(base)))
        console.print(f"[bold green]wrote[/] {out / 'eval.json'}" + "".join(f", {out / f}" for f in extra_files))
    else:
        console.print("[dim]not saved: pass out=<dir> to write eval.json[/]")
    return report


def _keep_harness(file: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``report`` plus the lm-evaluation-harness results an earlier `ftune eval harness.tasks=...` left in ``file``."""
    try:
        old = json.loads(file.read_text()) if file.exists() else {}
    except ValueError:
        old = {}
    return {**report, **{k: v for k, v in old.items() if k == "harness" or k.startswith("harness/")}}


def _confusion_table(matrix: list[list[int]], label_names: list[str]):
    from rich.table import Table

    table = Table(title="confusion (rows: true, columns: predicted)", header_style="bold")
    table.add_column("true \\ pred")
    for name in label_names:
        table.add_column(name, justify="right")
    table.add_column("support", justify="right")
    for name, row in zip(label_names, matrix, strict=True):
        table.add_row(name, *[str(v) for v in row], str(sum(row)))
    return table


def score_generations(model, tokenizer, data_cfg, max_length: int, seed: int, chat_template: str | None,
                      split: str, e, device: torch.device, metrics: dict[str, Any]) -> list[dict]:
    """Greedy answers to the eval prompts, scored with ``e.scorer``; adds eval/<scorer> to ``metrics``."""
    if data_cfg.format not in ("instruction", "chat"):
        raise FtuneError(
            f"eval.scorer={e.scorer} generates answers to prompts, which needs an instruction or chat dataset; "
            f"'{data_cfg.name}' is a {data_cfg.format} dataset. Drop eval.scorer to get loss and perplexity."
        )
    # the prompts as training formatted them, with the answer as the only target
    scored_cfg = replace(data_cfg, train_on_prompt=False)
    examples, _, _ = eval_examples(scored_cfg, tokenizer, max_length, seed, chat_template, split, e.max_samples)
    scores, rows = score_examples(model, tokenizer, examples, e.scorer, int(e.max_new_tokens), int(e.batch_size),
                                  device, data_cfg.name)
    metrics.update({f"eval/{k}": v for k, v in scores.items()})
    return rows


def score_examples(model, tokenizer, examples: list[dict], scorer: str, max_new_tokens: int, batch_size: int,
                   device: torch.device, name: str = "the eval set") -> tuple[dict[str, float], list[dict]]:
    """Greedy answers to encoded causal-LM examples' prompts, scored against their answers with ``scorer``.

    Returns ({scorer: share correct, "scored": count}, one row per example with prompt, prediction and
    verdict). The model is put in eval mode; the caller puts it back into training mode if needed.
    """
    from ftune.generate import generate_ids, stop_text
    from ftune.progress import console

    pairs = [p for p in (prompt_and_reference(x) for x in examples) if p is not None]
    if not pairs:
        raise FtuneError(
            f"No example of {name} has a prompt and an answer to score (with dataset.train_on_prompt=true the "
            f"whole text is the target). Score an instruction or chat dataset, or drop the scorer."
        )
    model.eval()
    with console.status(f"Generating {len(pairs)} answers (greedy, max_new_tokens={max_new_tokens})"):
        outputs = generate_ids(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, device=device, temperature=0.0)
    predictions = [stop_text(tokenizer.decode(o, skip_special_tokens=True), tokenizer) for o in outputs]
    references = [stop_text(tokenizer.decode(r, skip_special_tokens=True), tokenizer) for _, r in pairs]
    correct = score_answers(predictions, references, scorer)
    rows = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r, "prediction": pred,
         "answer": extract_answer(pred, scorer), "expected": extract_answer(r, scorer), "correct": c}
        for (p, _), r, pred, c in zip(pairs, references, predictions, correct, strict=True)
    ]
    return {scorer: sum(correct) / len(correct), "scored": len(correct)}, rows
