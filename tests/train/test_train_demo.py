"""The fusion demo: a fast smoke test of its outputs, and (slow) the claim that fusion wins."""
import json

import pytest
import torch

from mbt_fast.cli import main as cli_main
from mbt_fast.data.synthetic import BEST_UNIMODAL_ACCURACY
from mbt_fast.train.demo import VARIANTS, demo_variants, run_demo


def test_demo_smoke_summary_structure(tmp_path, capsys):
    out = tmp_path / "demo"
    n = torch.get_num_threads()
    assert cli_main(["demo", "--out", str(out), "--steps", "2", "--batch-size", "8", "--val-size", "16",
                     "--no-progress"]) == 0
    assert torch.get_num_threads() == n  # the demo restores the thread count
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(VARIANTS)
    for name, r in summary.items():
        assert set(r) == {"val_accuracy", "train_seconds"}, name
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["train_seconds"] > 0
        assert (out / name / "metrics.jsonl").exists()
    assert (out / "demo.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert all(name in table for name in VARIANTS) and "val accuracy" in table


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_bottleneck_fusion_beats_unimodal(tmp_path, seed):
    summary = run_demo(tmp_path / f"demo{seed}", seed=seed, progress=False, plot=False)
    acc = {k: v["val_accuracy"] for k, v in summary.items()}
    best_uni = max(acc["unimodal_rgb"], acc["unimodal_spectrogram"])
    assert best_uni <= BEST_UNIMODAL_ACCURACY + 0.06, acc  # the task really caps one modality
    assert acc["bottleneck_fusion"] >= best_uni + 0.15, acc
    assert acc["late_fusion"] >= best_uni + 0.1, acc


def test_trimodal_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo3"
    assert cli_main(["demo", "--preset", "tiny_trimodal", "--out", str(out), "--steps", "2", "--batch-size", "8",
                     "--val-size", "16", "--no-progress", "--variants", "unimodal_flow,bottleneck_fusion"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["unimodal_flow", "bottleneck_fusion"]
    assert demo_variants("tiny_trimodal") == ("unimodal_rgb", "unimodal_spectrogram", "unimodal_flow", "bottleneck_fusion_av",
                                         "late_fusion", "bottleneck_fusion")
    assert "best from rgb + spectrogram: 0.500" in capsys.readouterr().out


@pytest.mark.slow
def test_the_third_modality_matters(tmp_path):
    """Optical flow carries the task's motion bit: rgb + spectrogram alone are capped at 50 %, all three
    modalities fused reach far beyond it."""
    summary = run_demo(tmp_path / "demo3", preset="tiny_trimodal", variants=("bottleneck_fusion_av", "bottleneck_fusion"),
                       progress=False, plot=False)
    acc = {k: v["val_accuracy"] for k, v in summary.items()}
    assert acc["bottleneck_fusion_av"] <= 0.5 + 0.06, acc
    assert acc["bottleneck_fusion"] >= 0.5 + 0.3, acc
