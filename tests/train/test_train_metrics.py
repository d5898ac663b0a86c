"""Metrics (numpy mAP, top-k), Scenic's losses with label smoothing, the compound LR schedule."""
import math

import numpy as np
import pytest
import torch

from mbt_fast.train.losses import classification_loss, sigmoid_bce, smooth_targets, softmax_ce
from mbt_fast.train.metrics import average_precision, mean_average_precision, precision_at_1, topk_accuracy
from mbt_fast.train.schedule import compound_lr


def _ap_bruteforce(y, s):  # mean over positives of precision at that positive's rank (no ties)
    order = np.argsort(-s)
    y = y[order]
    hits = np.cumsum(y)
    return np.mean([hits[i] / (i + 1) for i in range(len(y)) if y[i]])


def test_average_precision_matches_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = (rng.random(30) < 0.3).astype(float)
        y[0] = 1
        s = rng.standard_normal(30)
        assert average_precision(y, s) == pytest.approx(_ap_bruteforce(y, s), abs=1e-12)
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    # ties form one threshold (sklearn): all tied -> AP = positive rate
    assert average_precision([1, 0, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_map_topk_prec1():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
    s = np.array([[3, 1, 0], [0, 2, 1], [0, 1, 2], [1, 0, 2]], dtype=float)
    # class 0: thresholds 3 (P 1, R .5), 1, 0 (two tied, P .5, R 1) -> .75; class 1 likewise .75;
    # class 2 has no positive (NaN, left out by nanmean)
    assert mean_average_precision(y, s) == pytest.approx(0.75)
    assert topk_accuracy(y, s, 1) == pytest.approx(0.5)
    assert topk_accuracy(y, s, 2) == pytest.approx(0.5)
    assert topk_accuracy(y, s, 3) == 1.0
    assert topk_accuracy(y, s, 5) == 1.0
    assert precision_at_1(y, s) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels and scores"):
        mean_average_precision(y, s[:, :2])


def test_losses_follow_scenic():
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(smooth_targets(t, 0.3), torch.tensor([[0.775, 0.075, 0.075, 0.775]]))
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 1.0, -2.0]])
    targets = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    st = smooth_targets(targets, 0.3)
    manual = -(st * torch.log(torch.sigmoid(logits)) + (1 - st) * torch.log(1 - torch.sigmoid(logits))).sum(1).mean()
    assert torch.allclose(sigmoid_bce(logits, targets, 0.3), manual)
    one_hot = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]])
    manual_ce = -(smooth_targets(one_hot, 0.1) * torch.log_softmax(logits, -1)).sum(1).mean()
    assert torch.allclose(softmax_ce(logits, one_hot, 0.1), manual_ce)
    assert torch.allclose(softmax_ce(logits, one_hot), torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])))
    per_mod = {"spectrogram": logits, "rgb": logits.flip(0)}
    expect = (softmax_ce(logits, one_hot) + softmax_ce(logits.flip(0), one_hot)) / 2
    assert torch.allclose(classification_loss(per_mod, one_hot, multi_label=False), expect)
    with pytest.raises(ValueError, match="label_smoothing"):
        smooth_targets(t, 1.0)


def test_compound_schedule():
    assert compound_lr(0, 1.0, 10, 100) == 0.0
    assert compound_lr(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert compound_lr(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert compound_lr(55, 1.0, 10, 100) == pytest.approx(0.5)  # half way through the cosine
    assert compound_lr(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert compound_lr(795, 0.5, 795, 15900) == pytest.approx(0.5)  # Scenic's AudioSet numbers
    assert compound_lr(3, 2.0, 0, 4) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    with pytest.raises(ValueError, match="warmup_steps"):
        compound_lr(0, 1.0, 20, 10)
