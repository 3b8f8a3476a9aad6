"""Batching: dynamic padding and length-grouped, resumable batch order."""

from __future__ import annotations

import random

import torch

from ftune.data.formats import IGNORE
from ftune.errors import FtuneError


class Collator:
    """Pad a list of examples to the longest one in the batch (right padding)."""

    def __init__(self, pad_token_id: int, task: str, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.task = task
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        n = len(examples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = torch.zeros((n, longest), dtype=torch.long)
        if self.task == "causal_lm":
            batch["labels"] = torch.full((n, longest), IGNORE, dtype=torch.long)
        elif self.task == "seq_cls":
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.tensor(e["input_ids"])
            attention_mask[i, :k] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][i, :k] = torch.tensor(e["token_type_ids"])
            if self.task == "causal_lm":
                batch["labels"][i, :k] = torch.tensor(e["labels"])
        return batch


class MaskingCollator:
    """Masked-LM batches (BERT's recipe): of the tokens that are neither special nor padding, each is a
    target with probability ``probability`` (0.15); a target's input becomes the mask token 80% of the
    time, a random token 10%, and stays itself 10%. Labels hold the original ids at the targets and
    IGNORE elsewhere. Draws come from torch's global generator, which checkpoints save and restore, so a
    resumed run masks exactly as the uninterrupted one."""

    def __init__(self, tokenizer, probability: float = 0.15):
        if tokenizer.mask_token_id is None:
            raise FtuneError(
                "Masked-LM training (dataset.format=masked_text) replaces tokens by the tokenizer's mask token, and "
                "this tokenizer has none: it is not an encoder's (BERT-style) tokenizer. Train a decoder with "
                "dataset.format=text (causal LM) instead."
            )
        self.pad = Collator(tokenizer.pad_token_id, "masked_lm")
        self.mask_id, self.vocab = tokenizer.mask_token_id, len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.probability = probability

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad(examples)
        ids = batch["input_ids"]
        candidate = batch["attention_mask"].bool() & ~torch.isin(ids, self.special)
        target = candidate & (torch.rand(ids.shape) < self.probability)
        draw = torch.rand(ids.shape)
        masked = target & (draw < 0.8)
        randomised = target & (draw >= 0.8) & (draw < 0.9)
        batch["labels"] = torch.where(target, ids, torch.full_like(ids, IGNORE))
        inputs = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
        batch["input_ids"] = torch.where(randomised, torch.randint(self.vocab, ids.shape), inputs)
        return batch


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  drop_last: bool = False) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of (seed, epoch).

    With ``group_by_length``, indices are shuffled, cut into mega-batches of 50 batches, and each
    mega-batch is sorted by length before being cut into batches, so a batch holds examples of
    similar length and pays for little padding; batch order is then shuffled again. Being a pure
    function makes the data order reproducible on resume.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        grouped = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
            grouped.extend(chunk)
        order = grouped
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        rng.shuffle(batches)
    return batches
