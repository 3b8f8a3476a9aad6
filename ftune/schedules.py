"""Learning-rate schedules with warmup, completed at the call site with the real step count.

Configs name them as partials (``_target_: ftune.schedules.cosine``, ``_partial_: true``) and the
trainer calls ``schedule(optimizer, total_steps=N)``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    return warmup_steps if warmup_steps is not None else int(round(total_steps * warmup_ratio))


def linear(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None,
           min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup to the peak lr, then linear decay to ``min_lr_ratio`` × peak at the last step."""
    warm = _warmup_steps(total_steps, warmup_ratio, warmup_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        return max(min_lr_ratio, 1.0 - (1.0 - min_lr_ratio) * progress)

    return LambdaLR(optimizer, factor)


def cosine(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None,
           min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup, then half a cosine down to ``min_lr_ratio`` × peak."""
    warm = _warmup_steps(total_steps, warmup_ratio, warmup_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.0,
             warmup_steps: int | None = None) -> LambdaLR:
    """Linear warmup, then the peak lr throughout."""
    warm = _warmup_steps(total_steps, warmup_ratio, warmup_steps)
    return LambdaLR(optimizer, lambda step: (step + 1) / (warm + 1) if step < warm else 1.0)
