"""Padding-free packing for causal LMs (``trainer.packing=true``).

A packed micro-batch is ONE row: whole examples joined end to end up to a token budget
(``trainer.pack_tokens``, default ``batch_size * max_length``), never split across rows, with no
padding at all. ``position_ids`` restart at 0 at every example, no attention mask is passed and the
forward gets ``use_cache=False``: transformers 5 (``masking_utils.find_packed_sequence_indices``)
then turns the position restarts into a block-diagonal causal mask for eager, sdpa and flex
attention, and flash-attention reads the sequence boundaries from ``cu_seq_lens``. With a cache
(``use_cache=True``, the model default) or any 2-D attention mask, transformers builds a plain causal
mask over the whole row instead and the examples silently attend to each other; so does any model
or method that ignores ``position_ids`` (peft's prompt learning drops them). Hence
:func:`check_packing` runs the prepared model on a tiny packed input at setup and refuses the run
when the examples are not kept apart.

The label of each example's first token is set to -100: the loss shifts labels by one, so without
that the last token of one example would be trained to predict the first token of the next.
An example's first token is never a target of the padded loss either, so the packed loss equals the
padded one, token for token.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch
from torch import nn

from ftune.data.formats import IGNORE
from ftune.errors import FtuneError

FIX = "set trainer.packing=false to train on padded batches"


def pack_budget(trainer) -> int:
    """Tokens per packed row: ``trainer.pack_tokens``, else ``batch_size * max_length``."""
    return trainer.pack_tokens or trainer.batch_size * trainer.max_length


def packed_batches(lengths: list[int], budget: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows (lists of example indices) of one epoch, a pure function of (seed, epoch).

    Examples are shuffled as :func:`ftune.data.collate.epoch_batches` shuffles them, then laid
    end to end: a row takes the next example while it fits in ``budget`` tokens, else a new row
    starts. No example is split or dropped (each is at most ``trainer.max_length`` <= budget tokens).
    Being pure, the order is the same on resume.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    used = budget + 1
    for i in order:
        if used + lengths[i] > budget:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def pack_examples(examples: list[dict], flash_attention: bool = False) -> dict[str, torch.Tensor]:
    """One row of shape (1, total tokens): input_ids, position_ids (restarting per example) and labels
    (the first label of every example set to -100); with ``flash_attention`` also the ``cu_seq_lens``
    and ``max_length`` keyword arguments of transformers' flash-attention path."""
    ids, positions, labels, lengths = [], [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids.extend(e["input_ids"])
        positions.extend(range(n))
        labels.extend([IGNORE, *e["labels"][1:]])
        lengths.append(n)
    batch = {"input_ids": torch.tensor([ids], dtype=torch.long),
             "position_ids": torch.tensor([positions], dtype=torch.long),
             "labels": torch.tensor([labels], dtype=torch.long)}
    if flash_attention:
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


class PackingCollator:
    """Collate a list of examples into one packed row (see :func:`pack_examples`)."""

    def __init__(self, flash_attention: bool = False):
        self.flash_attention = flash_attention

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pack_examples(examples, self.flash_attention)


def is_flash_attention(model: nn.Module) -> bool:
    implementation = str(getattr(model.config, "_attn_implementation", "") or "")
    return "flash" in implementation


def check_packing_settings(task: str, model_type: str | None = None) -> None:
    """Refuse what packing can never serve: classification, encoders."""
    if task != "causal_lm":
        raise FtuneError(
            f"trainer.packing=true joins causal-LM examples into one row, but this dataset is a {task} task "
            f"(one label per example, pooled over its own tokens); {FIX}."
        )
    if model_type in ENCODERS:
        raise FtuneError(
            f"trainer.packing=true needs a decoder whose causal mask transformers builds from position_ids, but "
            f"'{model_type}' is an encoder; {FIX}."
        )


ENCODERS = ("bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "albert")

# A tiny probe: example B after example A in one row, and again after A' (other tokens, same length).
PROBE_A, PROBE_B = 12, 7


@torch.no_grad()
def check_packing(model: nn.Module, method_name: str, device: torch.device,
                  autocast_dtype: torch.dtype | None, vocab_size: int) -> dict[str, float]:
    """Run the prepared model on a packed probe and refuse the run if the examples are not kept apart.

    Two checks on the second example B of a row [A, B]: its logits must not change when A's tokens
    change (they would if B attended to A), and they must match B's logits run alone (they would not
    if position ids were ignored). Costs three forwards of at most 19 tokens. Returns the measured
    differences (relative to the largest logit) for the record.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise FtuneError(
            f"trainer.packing=true cannot be used with method '{method_name}': peft's prompt learning prepends "
            f"virtual tokens to the row and drops position_ids, so the examples of a packed row would attend to "
            f"each other. Use a method such as lora, or {FIX}."
        )
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    low = min(10, vocab_size - 1)  # keep clear of special tokens where the vocabulary allows
    a, a_other, b = (torch.randint(low, vocab_size, (n,), generator=gen).tolist() for n in (PROBE_A, PROBE_A, PROBE_B))
    flash = is_flash_attention(model)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch.pop("labels")
        with amp:
            out = model(**batch, use_cache=False).logits.float()
        return out[0, -PROBE_B:]  # B's positions (prompt methods may prepend virtual tokens)

    try:
        def row(first):
            return pack_examples([{"input_ids": first, "labels": first}, {"input_ids": b, "labels": b}], flash)

        packed = logits(row(a))
        packed_other = logits(row(a_other))
        alone = logits({"input_ids": torch.tensor([b]), "labels": torch.tensor([b])})
    except Exception as e:  # noqa: BLE001  (a model or method whose forward cannot take a packed row)
        raise FtuneError(
            f"trainer.packing=true: the model with method '{method_name}' fails on a packed row "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {FIX}."
        ) from None
    finally:
        model.train(was_training)
    scale = max(float(alone.abs().max()), 1e-6)
    leak = float((packed - packed_other).abs().max()) / scale
    drift = float((packed - alone).abs().max()) / scale
    half = autocast_dtype is not None or next(model.parameters()).dtype != torch.float32
    tolerance = 2e-2 if half else 1e-4
    if leak > tolerance or drift > tolerance:
        implementation = getattr(model.config, "_attn_implementation", "?")
        raise FtuneError(
            f"trainer.packing=true would let packed examples see each other with this model "
            f"({model.config.model_type}, attention '{implementation}', method '{method_name}'): on a two-example "
            f"probe row the second example's logits moved by {leak:.2g} when the first example changed and differ "
            f"by {drift:.2g} from running it alone (relative to the largest logit; allowed {tolerance:g}), so "
            f"transformers did not build a block-diagonal mask from the position ids (or the method ignores them). "
            f"Use another method or model.attn_implementation (sdpa, eager, flex_attention, flash_attention_2), "
            f"or {FIX}."
        )
    return {"leak": leak, "drift": drift}
