"""Scenic's ``compound`` learning-rate schedule: ``constant * cosine_decay * linear_warmup``."""
from __future__ import annotations

import math


def compound_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based, so step 0 runs at lr 0 like Scenic).

    ``linear_warmup = min(1, step / warmup_steps)``;
    ``cosine_decay = 0.5 * (1 + cos(pi * p))`` with ``p = clip((step - warmup) / (total - warmup), 0, 1)``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return base_lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
