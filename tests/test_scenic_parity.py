"""The port against Scenic: Google's own Flax fixtures, and the NumPy oracle over many configurations."""
import dataclasses

import numpy as np
import pytest
import torch

import mbt_fast
from mbt_fast.config import MBTConfig
from scenic_oracle import random_inputs, scenic_forward, scenic_param_tree, to_torch_inputs, write_scenic_checkpoint

TOL = 2e-5


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_google_fixture(scenic_fixtures, backend):
    for case in sorted(p for p in scenic_fixtures.iterdir() if p.is_dir()):
        cfg = MBTConfig.from_json(case / "config.json")
        ckpt = next(case.glob("checkpoint_*"))
        inputs = to_torch_inputs(dict(np.load(case / "inputs.npz")))
        expected = np.load(case / "expected.npz")
        model = mbt_fast.load_scenic_checkpoint(ckpt, cfg, backend=backend)
        with torch.no_grad():
            err = np.abs(model(**inputs).numpy() - expected["logits_eval"]).max()
            assert err <= TOL, f"{case.name} eval logits: max abs error {err:.3e} > {TOL}"
            per_mod = model.train().forward_per_modality(**inputs)
        for m, logits in per_mod.items():
            err = np.abs(logits.numpy() - expected[f"logits_train_{m}"]).max()
            assert err <= TOL, f"{case.name} train logits[{m}]: max abs error {err:.3e} > {TOL}"


_BASE = MBTConfig(hidden_size=32, num_heads=4, mlp_dim=48, num_layers=4, fusion_layer=2, n_bottlenecks=4, num_classes=5,
                  input_shapes={"rgb": (-1, 4, 32, 48, 3), "spectrogram": (-1, 48, 32, 3)})
CASES = {
    "bottleneck": {},
    "early_fusion_1_bottleneck": dict(fusion_layer=0, n_bottlenecks=1),
    "fusion_3_of_4_7_bottlenecks_2_heads": dict(fusion_layer=3, n_bottlenecks=7, num_heads=2),
    "late_fusion": dict(fusion_layer=4),
    "vanilla": dict(use_bottleneck=False, fusion_layer=1),
    "vanilla_shared": dict(use_bottleneck=False, share_encoder=True, fusion_layer=2),
    "shared_bottleneck": dict(share_encoder=True),
    "no_test_bottlenecks": dict(test_with_bottlenecks=False),
    "spectrogram_only": dict(modality_fusion=("spectrogram",)),
    "rgb_only_8_heads": dict(modality_fusion=("rgb",), num_heads=8, use_bottleneck=False),
    "gap_vanilla": dict(classifier="gap", use_bottleneck=False, fusion_layer=1),
    "gmp_late": dict(classifier="gmp", use_bottleneck=False, fusion_layer=4),
    "representation": dict(representation_size=24),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_oracle_configurations(tmp_path, name, backend):
    cfg = dataclasses.replace(_BASE, **CASES[name])
    params = scenic_param_tree(cfg, seed=len(name))
    path = tmp_path / "checkpoint_7"
    write_scenic_checkpoint(path, params, train_state=name != "bottleneck")
    inputs = random_inputs(cfg, batch=3, seed=1)
    model = mbt_fast.load_scenic_checkpoint(path, cfg, backend=backend)
    with torch.no_grad():
        got = model(**to_torch_inputs(inputs)).double().numpy()
        got_train = model.train().forward_per_modality(**to_torch_inputs(inputs))
    want = scenic_forward(params, cfg, inputs)
    err = np.abs(got - want).max()
    assert err <= TOL * max(1.0, np.abs(want).max() / 10), f"{name} eval: max abs error {err:.3e} (|logits| max {np.abs(want).max():.2f})"
    want_train = scenic_forward(params, cfg, inputs, train=True)
    assert set(got_train) == set(want_train)
    for m in want_train:
        err = np.abs(got_train[m].double().numpy() - want_train[m]).max()
        assert err <= TOL * max(1.0, np.abs(want_train[m]).max() / 10), f"{name} train[{m}]: max abs error {err:.3e}"


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_oracle_real_mbt_b_token_counts(tmp_path, backend):
    """3137 RGB + 401 spectrogram tokens and 5 bottleneck rows, at a narrow width."""
    cfg = MBTConfig(hidden_size=32, num_heads=2, mlp_dim=32, num_layers=2, fusion_layer=1, num_classes=3)
    assert (cfg.num_tokens("rgb"), cfg.num_tokens("spectrogram"), cfg.num_bottleneck_tokens) == (3137, 401, 5)
    params = scenic_param_tree(cfg, seed=3, std=0.1)
    write_scenic_checkpoint(tmp_path / "ckpt", params)
    inputs = random_inputs(cfg, batch=1, seed=2)
    model = mbt_fast.load_scenic_checkpoint(tmp_path / "ckpt", cfg, backend=backend)
    with torch.no_grad():
        got = model(**to_torch_inputs(inputs)).double().numpy()
    err = np.abs(got - scenic_forward(params, cfg, inputs)).max()
    assert err <= TOL, f"MBT-B token counts: max abs error {err:.3e}"
