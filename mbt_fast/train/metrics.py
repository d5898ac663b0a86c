"""Evaluation metrics in numpy (no sklearn): mAP for multi-label, top-k accuracy for single label."""
from __future__ import annotations

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class as sklearn's ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k`` over the
    distinct score thresholds (tied scores form one threshold). NaN when there is no positive."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    num_pos = labels.sum()
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    # last index of each run of equal scores = one threshold
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = tp[last], (last + 1) - tp[last]
    precision = tp / (tp + fp)
    recall = tp / num_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """``nanmean`` over classes of the per-class AP (Scenic's ``compute_mean_average_precision``)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels and scores must both be [N, C]; got {labels.shape} and {scores.shape}")
    aps = np.array([average_precision(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])
    return float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")


def topk_accuracy(labels: np.ndarray, scores: np.ndarray, k: int = 1) -> float:
    """Fraction of examples whose target class (argmax of the label vector) is among the top-k scores."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    k = min(k, scores.shape[1])
    target = labels.argmax(1)
    topk = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((topk == target[:, None]).any(1).mean())


def precision_at_1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Multi-label train metric: is the top-scoring class a positive."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    return float((labels[np.arange(len(labels)), scores.argmax(1)] > 0.5).mean())
