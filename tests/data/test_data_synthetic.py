"""The synthetic audio-visual task: deterministic, right shapes, and fusion-dependent by construction."""
from collections import defaultdict
from fractions import Fraction

import torch

from mbt_fast.data.synthetic import BEST_UNIMODAL_ACCURACY, CLASS_TABLE, NUM_CLASSES, SyntheticAVDataset


def _best_accuracy(attr):  # Bayes accuracy of a model that only sees attribute `attr` (0 audio, 1 visual)
    joint = defaultdict(Fraction)  # (pattern, class) -> probability
    for c, choices in CLASS_TABLE.items():
        for p in choices[attr]:
            joint[(p, c)] += Fraction(1, NUM_CLASSES) / len(choices[attr])
    best = defaultdict(Fraction)
    for (p, _), pr in joint.items():
        best[p] = max(best[p], pr)
    return sum(best.values())


def test_class_table_caps_each_modality():
    assert _best_accuracy(0) == _best_accuracy(1) == Fraction(5, 8) == BEST_UNIMODAL_ACCURACY
    pairs = {}
    for c, (a, v) in CLASS_TABLE.items():
        for pa in a:
            for pv in v:
                assert pairs.setdefault((pa, pv), c) == c, "both modalities together determine the class"


def test_deterministic_shapes_and_splits():
    ds = SyntheticAVDataset(16, seed=1)
    a, b = ds[3], SyntheticAVDataset(16, seed=1)[3]
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["spectrogram"], b["spectrogram"])
    assert a["rgb"].shape == (3, 8, 32, 32) and a["spectrogram"].shape == (64, 32)
    assert a["rgb"].min() >= -1 and a["rgb"].max() <= 1 and a["label"].sum() == 1
    assert not torch.equal(SyntheticAVDataset(16, seed=1, split="val")[3]["rgb"], a["rgb"])
    assert not torch.equal(ds[(3, 99)]["rgb"], a["rgb"])  # the sampler's per-epoch seed gives a fresh example
    assert torch.equal(ds[(3, 99)]["rgb"], ds[(3, 99)]["rgb"])
    only = SyntheticAVDataset(16, seed=1, modalities=("rgb",))[3]
    assert "spectrogram" not in only and torch.equal(only["rgb"], a["rgb"])  # same example for every variant
    big = SyntheticAVDataset(4, rgb_shape=(32, 64, 64), spectrogram_shape=(128, 128))[0]
    assert big["rgb"].shape == (3, 32, 64, 64) and big["spectrogram"].shape == (128, 128)
    labels = torch.stack([ds[i]["label"] for i in range(16)]).argmax(1)
    assert len(set(labels.tolist())) > 4


def test_patterns_are_visible_in_the_signal():
    # the audio band sits at the pattern's mel position; the visual colour follows warm/cool
    ds = SyntheticAVDataset(400, seed=0)
    for i in range(40):
        item = ds[i]
        c = int(item["label"].argmax())
        audio_choices = CLASS_TABLE[c][0]
        if len(audio_choices) == 1:
            centre = (audio_choices[0] + 0.5) * 32 / 6
            peak = item["spectrogram"].mean(0).argmax().item()
            assert abs(peak - centre) <= 3, (c, peak, centre)
