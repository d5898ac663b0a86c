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


def test_extra_modalities_carry_the_motion_bit():
    """flow and a feature sequence show bit = label // 8 and nothing else; the AV part is the 2-modality task's."""
    import math

    from mbt_fast.data.synthetic import make_features

    mods = ("spectrogram", "rgb", "flow", "tokens")
    ds = SyntheticAVDataset(64, seed=2, modalities=mods, extra_shapes={"flow": (4, 16, 16), "tokens": (10, 24)})
    av = SyntheticAVDataset(64, seed=2)
    assert ds.num_classes == 16 and ds.best_unimodal_accuracy == BEST_UNIMODAL_ACCURACY / 2
    protos = torch.randn(2, 24, generator=torch.Generator().manual_seed(1234 + 24))
    bits = []
    for i in range(64):
        item, ref = ds[i], av[i]
        assert item["flow"].shape == (2, 4, 16, 16) and item["tokens"].shape == (10, 24)
        assert torch.equal(item["rgb"], ref["rgb"]) and torch.equal(item["spectrogram"], ref["spectrogram"])
        label = int(item["label"].argmax())
        assert label % 8 == int(ref["label"].argmax())
        bit = label // 8
        bits.append(bit)
        # the moving patch (a quarter of the frame) against the background's shake: it moves right (bit 0)
        # or up (bit 1, y negative in image coordinates)
        mean = item["flow"].mean(1).flatten(1)  # [2, H*W]
        rel = mean - mean.median(dim=1, keepdim=True).values
        patch = rel[:, rel.norm(dim=0).topk(rel.shape[1] // 4).indices].mean(1)
        angle = math.atan2(-patch[1].item(), patch[0].item())
        assert abs(angle - bit * math.pi / 2) < 0.6, (i, bit, angle)
        proj = item["tokens"] @ (protos / protos.norm(dim=1, keepdim=True)).T  # [n, 2]
        assert proj.max(0).values.argmax().item() == bit, (i, bit, proj.max(0).values)
    assert 10 < sum(bits) < 54
    assert make_features(0, (10, 24), torch.Generator().manual_seed(0)).shape == (10, 24)


def test_extra_modalities_are_checked():
    import pytest

    with pytest.raises(ValueError, match=r"extra_shapes\['flow'\]: expected flow \(T, H, W\)"):
        SyntheticAVDataset(4, extra_shapes={"flow": (4, 16)})
    with pytest.raises(ValueError, match=r"modalities: \['tokens'\] need a shape in extra_shapes"):
        SyntheticAVDataset(4, modalities=("rgb", "tokens"))
