"""MBT: every fast backend against ``reference`` on every fusion mode, forward and all gradients;
stochastic depth, inputs, backends, presets."""
import dataclasses

import pytest
import torch

import mbt_fast
from compare import assert_close_2x
from mbt_fast.backends import unavailable_reasons
from mbt_fast.config import MBTConfig
from mbt_fast.modalities import scenic_order

TINY = MBTConfig(hidden_size=32, num_heads=1, mlp_dim=48, num_layers=3, fusion_layer=1, n_bottlenecks=3, num_classes=4,
                 input_shapes={"rgb": (-1, 4, 32, 32, 3), "spectrogram": (-1, 48, 16, 3)})
MODES = {
    "bottleneck": {},
    "early_fusion": dict(fusion_layer=0, n_bottlenecks=1),
    "late_fusion": dict(fusion_layer=3),
    "vanilla": dict(use_bottleneck=False),
    "vanilla_shared": dict(use_bottleneck=False, share_encoder=True),
    "shared_bottleneck": dict(share_encoder=True, n_bottlenecks=6),
    "spectrogram_only": dict(modality_fusion=("spectrogram",)),
    "rgb_only": dict(modality_fusion=("rgb",), use_bottleneck=False),
    "gap": dict(classifier="gap", use_bottleneck=False),
    "gap_bottleneck": dict(classifier="gap", n_bottlenecks=2),
    "representation": dict(representation_size=16),
}
# (forward, gradient) tolerances per backend in fp32: torch is exact up to summation order
TOLS = {"eager_sdpa": (1e-5, 1e-5), "torch": (1e-5, 1e-5), "triton": (1e-4, 1e-3), "cuda-emu": (1e-4, 1e-3)}


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = mbt_fast.MBT(cfg, backend="reference")
    with torch.no_grad():  # no zero-initialised parameter may hide a wrong path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_inputs(cfg, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in scenic_order(cfg.modality_fusion):  # rgb in [-1, 1]; flow, features, spectrogram standard normal
        shape = (batch, *cfg.input_shape(m))
        out[m] = torch.rand(shape, generator=g) * 2 - 1 if m == "rgb" else torch.randn(shape, generator=g)
    return out


def run(model, inputs, backend):
    model.set_backend(backend).zero_grad()
    model.train()
    logits = model.forward_per_modality(**inputs)
    weights = torch.Generator().manual_seed(5)
    loss = sum((v * torch.randn(v.shape, generator=weights)).sum() for v in logits.values())
    loss.backward()
    model.eval()
    with torch.no_grad():
        eval_logits = model(**inputs)
    return logits, eval_logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def skip_unavailable(backend):
    reasons = unavailable_reasons(backend, torch.device("cpu"))
    if reasons:
        pytest.skip(f"{backend} unavailable here: {'; '.join(reasons)}")


def check_matches_reference(cfg, backend, name):
    """fp32 on ``backend`` against ``reference``: train and eval logits, every parameter gradient (relative)."""
    model = make_model(cfg)
    inputs = make_inputs(cfg, batch=3)
    ref_logits, ref_eval, ref_grads = run(model, inputs, "reference")
    logits, eval_logits, grads = run(model, inputs, backend)
    fwd_tol, bwd_tol = TOLS[backend]
    err = (eval_logits - ref_eval).abs().max().item()
    assert err <= fwd_tol, f"{name} eval logits: {err:.3e} > {fwd_tol}"
    for m in ref_logits:
        err = (logits[m] - ref_logits[m]).abs().max().item()
        assert err <= fwd_tol, f"{name} train logits[{m}]: {err:.3e} > {fwd_tol}"
    unused = {"bottleneck"} if not model._uses_bottleneck() or cfg.fusion_layer == cfg.num_layers else set()
    expected = {n for n, p in model.named_parameters()} - unused
    assert set(ref_grads) >= expected and set(grads) >= expected, f"missing gradients: {expected - set(grads)}"
    for n in expected:
        scale = max(1.0, ref_grads[n].abs().max().item())
        err = (grads[n] - ref_grads[n]).abs().max().item() / scale
        assert err <= bwd_tol, f"{name} grad {n}: relative error {err:.3e} (reference max {scale:.3e}) > {bwd_tol}"


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("backend", ["eager_sdpa", "torch", "triton"])
def test_backend_matches_reference(mode, backend):
    skip_unavailable(backend)
    check_matches_reference(dataclasses.replace(TINY, **MODES[mode]), backend, f"{mode}/{backend}")


def run_autocast(model, inputs, backend, dtype=torch.bfloat16):
    with torch.autocast("cpu", dtype=dtype):
        return run(model, inputs, backend)


@pytest.mark.parametrize("mode", ["bottleneck", "vanilla", "vanilla_shared", "late_fusion", "spectrogram_only", "gap_bottleneck"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emu"])
def test_backend_matches_reference_bf16_autocast(mode, backend):
    """bf16 autocast (the training setting): the 2x rule of DESIGN.md §6 against the fp32 reference, with
    the reference itself under autocast as the eager low-precision baseline. cuda-emu's attention runs
    only fp16/bf16, so this is where its model-level parity is tested."""
    skip_unavailable(backend)
    cfg = dataclasses.replace(TINY, **MODES[mode])
    model = make_model(cfg)
    inputs = make_inputs(cfg, batch=3)
    _, ref_eval, ref_grads = run(model, inputs, "reference")
    _, low_eval, low_grads = run_autocast(model, inputs, "reference")
    _, eval_logits, grads = run_autocast(model, inputs, backend)
    assert_close_2x(eval_logits.float(), ref_eval, low_eval.float(), torch.bfloat16, name=f"{mode}/{backend} eval logits")
    for n, g in ref_grads.items():
        scale = max(1.0, g.abs().max().item())
        assert_close_2x(grads[n] / scale, g / scale, low_grads[n] / scale, torch.bfloat16, backward=True,
                        name=f"{mode}/{backend} grad {n} (relative)")


def test_cuda_backend_rejects_fp32_attention():
    skip_unavailable("cuda-emu")
    model = make_model(TINY).set_backend("cuda-emu")
    with pytest.raises(TypeError, match="float32"):
        model(**make_inputs(TINY, 1))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_stochastic_depth_drops_whole_branches_without_rescale(backend):
    cfg = dataclasses.replace(TINY, stochastic_droplayer_rate=0.5)
    model = make_model(cfg).set_backend(backend).train()
    inputs = make_inputs(cfg, batch=2)
    assert [b["rgb"].droplayer_p for b in model.blocks] == [0.0, 0.25, 0.5]
    # every branch dropped: the encoder is the identity, the logits those of the embeddings
    for blocks in model.blocks:
        for blk in blocks.values():
            blk.droplayer_p = 0.999999999
    feats = list(model.forward_features(**inputs).values())
    embedded = [model.tokenize(m, inputs[m]) for m in cfg.modality_fusion]
    for f, e in zip(feats, embedded):
        torch.testing.assert_close(f, e, rtol=0, atol=0)
    # p -> 0 in train mode equals eval mode (no 1/(1-p) rescale of kept branches)
    for blocks in model.blocks:
        for blk in blocks.values():
            blk.droplayer_p = 1e-12
    train_out = model(**inputs)
    torch.testing.assert_close(train_out, model.eval()(**inputs), rtol=0, atol=1e-6)


def test_stochastic_depth_is_per_example():
    cfg = dataclasses.replace(TINY, stochastic_droplayer_rate=0.5, num_layers=2, fusion_layer=2)
    model = make_model(cfg).set_backend("torch").train()
    inputs = make_inputs(cfg, batch=256)
    torch.manual_seed(0)
    out = model(**inputs)
    with torch.no_grad():
        model.eval()
        clean = model(**inputs)
    # the last layer (p=0.5) has 4 independent per-example draws (2 modalities x 2 branches):
    # an example is untouched only when all 4 keep, with probability 1/16
    untouched = ((out - clean).abs().amax(1) <= 1e-6).float().mean().item()
    assert 0.02 < untouched < 0.15, f"fraction of examples untouched by drops: {untouched} (expected about 1/16)"


def test_deterministic_repeats():
    model = make_model(TINY).set_backend("torch").eval()
    inputs = make_inputs(TINY, batch=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs), model(**inputs))


def test_mbt_base_parameter_count_and_forward():
    cfg = MBTConfig.preset("mbt_base_16x2")
    model = mbt_fast.MBT(cfg, backend="torch").eval()
    # Scenic's 175,009,295 minus the spectrogram kernel's two folded input channels (2 * 16*16*768)
    assert sum(p.numel() for p in model.parameters()) == 175_009_295 - 2 * 16 * 16 * 768
    with torch.no_grad():
        logits = model(**make_inputs(cfg, batch=1))
    assert logits.shape == (1, 527) and torch.isfinite(logits).all()


@pytest.mark.parametrize("preset,count", [("mbt_base_16x2_spec", 86_360_591 - 2 * 16 * 16 * 768),
                                          ("mbt_base_16x2_rgb", 89_055_503 - 5 * 768)])
def test_single_modality_presets(preset, count):
    model = mbt_fast.MBT(MBTConfig.preset(preset))
    assert sum(p.numel() for p in model.parameters()) == count


def test_set_backend_keeps_weights_and_rejects_unknown():
    model = make_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend("torch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="backend: expected one of"):
        model.set_backend("tpu")


def test_explicit_unavailable_backend_lists_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: triton is available")
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: .*TRITON_INTERPRET"):
        mbt_fast.MBT(TINY, backend="triton")


def test_auto_runs_the_model_on_what_it_picks():
    """The ranking itself is tested in test_backend_evidence.py; here the model runs on auto's pick."""
    model = make_model(TINY)
    model.set_backend("auto").eval()
    ref = make_model(TINY).set_backend("reference").eval()
    inputs = make_inputs(TINY, 1)
    with torch.no_grad():
        assert_close_2x(model(**inputs), ref(**inputs), None, torch.float32, name="auto")


@pytest.mark.parametrize("change,match", [
    (lambda i: i.update(rgb=i["rgb"][:, :, :2]), r"rgb: expected shape \[B, 3, T, H, W\] = \[B, 3, 4, 32, 32\], got \(2, 3, 2, 32, 32\)"),
    (lambda i: i.update(spectrogram=i["spectrogram"].long()), "spectrogram: expected a floating-point tensor, got torch.int64"),
    (lambda i: i.pop("rgb"), "rgb: expected a tensor"),
    (lambda i: i.update(spectrogram=i["spectrogram"][:1]), "expected one batch size"),
    (lambda i: i.update(rgb=i["rgb"].numpy()), "rgb: expected a torch.Tensor, got ndarray"),
])
def test_bad_inputs(change, match):
    model = make_model(TINY).set_backend("torch")
    inputs = make_inputs(TINY, batch=2)
    change(inputs)
    with pytest.raises((ValueError, TypeError), match=match):
        model(**inputs)


def test_single_modality_rejects_other_input():
    cfg = dataclasses.replace(TINY, modality_fusion=("spectrogram",))
    model = make_model(cfg)
    with pytest.raises(ValueError, match=r"rgb: this model's modality_fusion is \('spectrogram',\)"):
        model(**make_inputs(TINY, 1))


@pytest.mark.parametrize("field,value,match", [
    ("fusion_layer", 9, "fusion_layer: expected 0 <= fusion_layer <= num_layers"),
    ("classifier", "mean", "classifier: expected one of"),
    ("modality_fusion", ("audio",), "modality_fusion: .audio. is not a registered modality"),
    ("modality_fusion", ("rgb", "rgb"), "modality_fusion: expected distinct names"),
    ("num_heads", 3, "hidden_size: expected a multiple of num_heads=3"),
    ("input_shapes", {"rgb": (-1, 3, 32, 32, 3), "spectrogram": (-1, 48, 16, 3)}, "T, H, W divisible"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})


def test_from_scenic_nested_layout():
    nested = {"model": {"hidden_size": 32, "num_heads": 2, "mlp_dim": 48, "num_layers": 2, "fusion_layer": 1,
                        "patches": {"size": [16, 16, 2]}, "temporal_encoding_config": {"method": "3d_conv"},
                        "classifier": "token", "use_bottleneck": True, "n_bottlenecks": 2,
                        "modality_fusion": ["spectrogram", "rgb"], "attention_config": {"type": "spacetime"}},
              "dataset_configs": {"num_frames": 4, "crop_size": 32, "num_spec_frames": 1, "spec_shape": [48, 16]},
              "num_classes": 9, "lr": 0.5}
    cfg = MBTConfig.from_scenic(nested)
    assert cfg.rgb_shape == (4, 32, 32) and cfg.spectrogram_shape == (48, 16) and cfg.num_classes == 9
    assert cfg.num_tokens("rgb") == 9 and cfg.num_tokens("spectrogram") == 4


def test_save_and_from_pretrained_roundtrip(tmp_path):
    model = make_model(TINY).eval()
    model.save_pretrained(tmp_path / "m.safetensors")
    loaded = mbt_fast.MBT.from_pretrained(tmp_path / "m.safetensors", backend="torch")
    inputs = make_inputs(TINY, 2)
    with torch.no_grad():
        assert torch.equal(model.set_backend("torch")(**inputs), loaded(**inputs))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cuda-emu"])
def test_backend_at_mbt_b_token_counts(backend):
    """One fusion layer at the real token counts: 401 + 3137 tokens, 5 bottleneck rows per modality
    (triton in fp32, cuda-emu under bf16 autocast: its attention is fp16/bf16 only)."""
    skip_unavailable(backend)
    cfg = MBTConfig(hidden_size=64, num_heads=2, mlp_dim=64, num_layers=1, fusion_layer=0, num_classes=3)
    model = make_model(cfg)
    inputs = make_inputs(cfg, batch=1)
    _, ref_eval, ref_grads = run(model, inputs, "reference")
    if backend == "triton":
        _, eval_logits, grads = run(model, inputs, backend)
        low_eval, low_grads, dtype = ref_eval, ref_grads, torch.float32
    else:
        _, low_eval, low_grads = run_autocast(model, inputs, "reference")
        _, eval_logits, grads = run_autocast(model, inputs, backend)
        dtype = torch.bfloat16
    assert_close_2x(eval_logits.float(), ref_eval, low_eval.float(), dtype, name=f"{backend} eval logits")
    for n, g in ref_grads.items():
        scale = max(1.0, g.abs().max().item())
        assert_close_2x(grads[n] / scale, g / scale, low_grads[n] / scale, dtype, backward=True, name=f"{backend} grad {n}")
