"""Scenic's classification losses with its label smoothing, averaged over per-modality logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_targets(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Scenic's smoothing ``t * (1 - ls) + ls / C`` (applied after mixup, as in its train step)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing == 0.0:
        return targets
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Multi-label: sigmoid cross-entropy summed over classes, mean over examples."""
    t = smooth_targets(targets.float(), label_smoothing)
    per = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none").sum(-1)
    return per.mean()


def softmax_ce(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Single label: softmax cross-entropy against (soft, smoothed) target vectors, mean over examples."""
    t = smooth_targets(targets.float(), label_smoothing)
    return -(t * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def classification_loss(logits, targets: torch.Tensor, multi_label: bool, label_smoothing: float = 0.0) -> torch.Tensor:
    """``logits``: a tensor or Scenic's train-mode dict ``{modality: [B, C]}`` (loss = mean over modalities)."""
    fn = sigmoid_bce if multi_label else softmax_ce
    if isinstance(logits, dict):
        return sum(fn(v, targets, label_smoothing) for v in logits.values()) / len(logits)
    return fn(logits, targets, label_smoothing)
