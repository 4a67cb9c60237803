"""The MAE learning-rate recipe: ``lr = blr * global_batch / 256``, linear warmup, cosine decay.

The schedule is a pure function of the optimizer step, so resuming needs only the step.
"""

from __future__ import annotations

import math

__all__ = ["scaled_lr", "cosine_lr", "default_warmup_steps", "total_steps"]


def scaled_lr(blr: float, global_batch: int) -> float:
    """MAE's linear scaling rule: the absolute lr of base lr ``blr`` at ``global_batch`` images per step."""
    return blr * (global_batch / 256)  # the same float as (blr * global_batch) / 256, without its overflow


def total_steps(max_steps: int | None, epochs: float | None, *, micro_per_epoch: int, accum_steps: int,
                default: int) -> int:
    """The run's optimizer steps: ``max_steps`` if given, else ``epochs`` passes over the data of
    ``micro_per_epoch`` micro-batches (at least one step), else ``default``."""
    if max_steps is not None:
        return max_steps
    if epochs is not None:
        return max(1, math.ceil(epochs * micro_per_epoch / accum_steps))
    return default


def default_warmup_steps(max_steps: int) -> int:
    """5% of the run (MAE: 40 warmup epochs of 800), at least one step."""
    return max(1, round(0.05 * max_steps))


def cosine_lr(step: int, *, lr: float, max_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup_steps``
    during warmup, then a half cosine from ``lr`` down to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
