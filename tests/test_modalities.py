"""Any set of modalities: the registry, and M = 3 and M = 4 models (rgb, spectrogram, flow, tokens and a
registered one) on every backend against the reference, every fusion mode defined for M > 2, odd token and
bottleneck counts, batch 3; one attention call per layer whatever M; save/load; flow initialised from RGB."""

import pytest
import torch
import torch.nn as nn

import mbt_fast
from compare import assert_close_2x
from mbt_fast import modalities
from mbt_fast.config import MBTConfig
from mbt_fast.modalities import FeatureEmbedding, ModalityEmbedding, register_modality
from test_model import TOLS, check_matches_reference, make_inputs, make_model, run, run_autocast, skip_unavailable

# untuned sizes: token counts 1+5 (tokens), 1+6 (flow: 2 x 1 x 3 tubelets of 2x4x4 on 4x4x12),
# 1+6 (spectrogram 12x8 in 4x4 patches), 1+8 (rgb), 3 bottlenecks (+1 CLS row)
SHAPES = {"rgb": (-1, 4, 8, 8, 3), "flow": (-1, 4, 4, 12, 2), "spectrogram": (-1, 12, 8, 3), "tokens": (-1, 5, 7)}
BASE = dict(hidden_size=32, num_heads=1, mlp_dim=40, num_layers=3, fusion_layer=1, n_bottlenecks=3, num_classes=5,
            patches_size=(4, 4, 2))
SETS = {"M3": ("flow", "spectrogram", "rgb"), "M4": ("tokens", "rgb", "flow", "spectrogram")}
MODES = {  # every fusion mode of MBT that is defined for more than two modalities
    "bottleneck": {},
    "early_fusion": dict(fusion_layer=0, n_bottlenecks=2),
    "late_fusion": dict(fusion_layer=3),
    "vanilla": dict(use_bottleneck=False),
    "vanilla_shared": dict(use_bottleneck=False, share_encoder=True),
    "shared_bottleneck": dict(share_encoder=True, n_bottlenecks=5),
    "gap_bottleneck": dict(classifier="gap", n_bottlenecks=1),
}


def config(mods, **kw):
    return MBTConfig(**{**BASE, **kw}, modality_fusion=mods, input_shapes={m: SHAPES[m] for m in mods})


def test_token_counts_follow_each_modalitys_contract():
    cfg = config(SETS["M4"])
    assert [cfg.num_tokens(m) for m in cfg.modality_fusion] == [6, 9, 7, 7]
    assert cfg.input_shape("flow") == (2, 4, 4, 12) and cfg.input_shape("tokens") == (5, 7)
    assert cfg.patch_grid("flow") == (2, 1, 3)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("mods", sorted(SETS))
@pytest.mark.parametrize("backend", ["eager_sdpa", "torch", "triton"])
def test_backend_matches_reference(backend, mods, mode):
    """fp32: logits <= 1e-4 (torch/eager 1e-5), every parameter gradient <= 1e-3 relative."""
    skip_unavailable(backend)
    check_matches_reference(config(SETS[mods], **MODES[mode]), backend, f"{mods}/{mode}/{backend}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["bottleneck", "vanilla", "shared_bottleneck"])
@pytest.mark.parametrize("mods", sorted(SETS))
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda-emu"])
def test_backend_matches_reference_low_precision(backend, mods, mode, dtype):
    """Autocast fp16/bf16: the 2x rule of DESIGN.md section 6 against the fp32 reference, the reference
    under the same autocast as the eager low-precision baseline (cuda-emu's attention is fp16/bf16 only)."""
    skip_unavailable(backend)
    cfg = config(SETS[mods], **MODES[mode])
    model = make_model(cfg)
    inputs = make_inputs(cfg, batch=3)
    _, ref_eval, ref_grads = run(model, inputs, "reference")
    _, low_eval, low_grads = run_autocast(model, inputs, "reference", dtype)
    _, eval_logits, grads = run_autocast(model, inputs, backend, dtype)
    name = f"{mods}/{mode}/{backend}/{dtype}"
    assert_close_2x(eval_logits.float(), ref_eval, low_eval.float(), dtype, name=f"{name} eval logits")
    for n, g in ref_grads.items():
        scale = max(1.0, g.abs().max().item())
        assert_close_2x(grads[n] / scale, g / scale, low_grads[n] / scale, dtype, backward=True,
                        name=f"{name} grad {n} (relative)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_attention_call_per_layer_for_any_m(backend, monkeypatch):
    """Kernels and model keep one contract: a layer's attention over all modalities is one op call (one
    kernel launch per direction), and M changes only the segment table."""
    skip_unavailable(backend)
    from mbt_fast import layers

    calls = []
    real = layers.ops.mbt_attention_qkv
    monkeypatch.setattr(layers.ops, "mbt_attention_qkv", lambda qkv, segments, **kw: calls.append(len(segments)) or real(qkv, segments, **kw))
    for mods in (("spectrogram", "rgb"), SETS["M3"], SETS["M4"]):
        calls.clear()
        cfg = config(mods)
        model = make_model(cfg).set_backend(backend).eval()
        with torch.no_grad():
            model(**make_inputs(cfg, batch=2))
        assert calls == [len(mods)] * cfg.num_layers, f"{mods}: attention calls (segments each) {calls}"


def test_bottleneck_is_the_mean_over_all_modalities():
    """After a fusion layer each modality's bottleneck slot holds the mean of the M updated slots."""
    cfg = config(SETS["M4"], num_layers=1, fusion_layer=0)
    model = make_model(cfg).eval()
    inputs = make_inputs(cfg, batch=3)
    tokens = {m: model.tokenize(m, inputs[m]) for m in cfg.modality_fusion}
    B = 3
    with torch.no_grad():
        updated = [model.block(0, m)(torch.cat([tokens[m], model.bottleneck.expand(B, -1, -1)], 1))[:, tokens[m].shape[1]:]
                   for m in cfg.modality_fusion]
        expected = sum(updated) / len(updated)
        for backend in ("reference", "torch"):
            _, bottle, _ = model.set_backend(backend)._encode(inputs, "error")
            torch.testing.assert_close(bottle, expected, rtol=1e-5, atol=1e-6)


def test_save_and_load_a_three_modality_model(tmp_path):
    cfg = config(SETS["M3"])
    model = make_model(cfg).set_backend("torch").eval()
    model.save_pretrained(tmp_path / "m3.safetensors")
    loaded = mbt_fast.MBT.from_pretrained(tmp_path / "m3.safetensors")
    assert loaded.cfg == cfg
    assert {"embed_flow.weight", "cls_flow", "pos_embed_flow", "blocks.0.flow.attn.qkv.weight"} <= set(loaded.state_dict())
    inputs = make_inputs(cfg, batch=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs), loaded(**inputs))


class _Imu(nn.Conv1d, ModalityEmbedding):
    """A user's tokenizer: windows of 4 samples of a 6-axis IMU stream ``[B, 6, L]``, one token each."""

    config_layout = input_layout = "[B, 6, L]"

    @classmethod
    def token_grid(cls, shape, patches_size):
        if len(shape) != 2 or shape[0] != 6 or shape[1] % 4:
            raise ValueError(f"[B, 6, L] with L a multiple of 4, got {(-1, *shape)}")
        return (shape[1] // 4,)

    @classmethod
    def input_shape(cls, shape):
        return tuple(shape)

    @classmethod
    def create(cls, shape, patches_size, dim):
        return cls(6, dim, 4, stride=4)

    def reset_scenic(self):
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype)).transpose(1, 2)


@pytest.fixture
def registered():
    register_modality("imu", _Imu)
    register_modality("text", FeatureEmbedding)
    yield
    for name in ("imu", "text"):
        modalities._REGISTRY.pop(name, None)


def test_a_registered_modality_trains_saves_and_loads(registered, tmp_path):
    cfg = MBTConfig(**BASE, modality_fusion=("imu", "rgb", "text"),
                    input_shapes={"imu": (-1, 6, 20), "rgb": SHAPES["rgb"], "text": (-1, 3, 11)})
    assert cfg.num_tokens("imu") == 6 and cfg.num_tokens("text") == 4
    model = make_model(cfg)
    inputs = {"imu": torch.randn(3, 6, 20), "rgb": torch.rand(3, 3, 4, 8, 8) * 2 - 1, "text": torch.randn(3, 3, 11)}
    ref_logits, ref_eval, ref_grads = run(model, inputs, "reference")
    logits, eval_logits, grads = run(model, inputs, "torch")
    assert (eval_logits - ref_eval).abs().max().item() <= 1e-5
    assert grads["embed_imu.weight"].abs().sum() > 0
    model.save_pretrained(tmp_path / "imu.safetensors")
    loaded = mbt_fast.MBT.from_pretrained(tmp_path / "imu.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model.eval()(**inputs))
    modalities._REGISTRY.pop("imu")
    with pytest.raises(ValueError, match="'imu' is not a registered modality"):
        mbt_fast.MBT.from_pretrained(tmp_path / "imu.safetensors")


@pytest.mark.parametrize("name,embedding,error,match", [
    ("rgb", FeatureEmbedding, ValueError, "'rgb' is built in"),
    ("missing", FeatureEmbedding, ValueError, "identifier not in"),
    ("my-text", FeatureEmbedding, ValueError, "identifier"),
    ("text2", nn.Linear, TypeError, "ModalityEmbedding"),
])
def test_register_modality_rejects(name, embedding, error, match):
    with pytest.raises(error, match=match):
        register_modality(name, embedding)


def test_register_modality_twice_needs_replace(registered):
    with pytest.raises(ValueError, match="registered already"):
        register_modality("imu", FeatureEmbedding)
    register_modality("imu", FeatureEmbedding, replace=True)
    assert modalities.get_embedding("imu") is FeatureEmbedding


@pytest.mark.parametrize("mods,shapes,match", [
    (("flow", "rgb"), {"flow": (-1, 4, 8, 8, 3), "rgb": SHAPES["rgb"]}, r"input_shapes\['flow'\]: expected \[B, T, H, W, 2\] \(2 channels last\)"),
    (("tokens", "rgb"), {"tokens": (-1, 5), "rgb": SHAPES["rgb"]}, r"input_shapes\['tokens'\]: expected 3 dims \[B, n, d_in\]"),
    (("audio", "rgb"), {"audio": (-1, 5, 3), "rgb": SHAPES["rgb"]}, "'audio' is not a registered modality"),
    (("flow", "rgb"), {"flow": (-1, 3, 8, 8, 2), "rgb": SHAPES["rgb"]}, "divisible by the tubelet"),
])
def test_config_rejects_bad_modalities(mods, shapes, match):
    with pytest.raises(ValueError, match=match):
        MBTConfig(**BASE, modality_fusion=mods, input_shapes=shapes)


def test_bad_input_names_the_modality_and_its_layout():
    cfg = config(SETS["M4"])
    model = make_model(cfg).set_backend("torch")
    inputs = make_inputs(cfg, batch=2)
    inputs["tokens"] = inputs["tokens"][:, :, :6]
    with pytest.raises(ValueError, match=r"tokens: expected shape \[B, n, d_in\] = \[B, 5, 7\], got \(2, 5, 6\)"):
        model(**inputs)
    inputs = make_inputs(cfg, batch=2)
    inputs["flwo"] = inputs.pop("flow")
    with pytest.raises(ValueError, match="flwo: this model's modality_fusion is"):
        model(**inputs)


def test_flow_from_rgb_averages_the_rgb_kernel_over_its_channels():
    from mbt_fast.vit_init import flow_from_rgb

    cfg = MBTConfig(**BASE, modality_fusion=("flow", "rgb"), input_shapes={"flow": SHAPES["rgb"][:4] + (2,), "rgb": SHAPES["rgb"]})
    model = make_model(cfg)
    flow_from_rgb(model)
    w = model.embed_rgb.weight
    torch.testing.assert_close(model.embed_flow.weight, w.mean(1, keepdim=True).expand(-1, 2, -1, -1, -1))
    assert torch.equal(model.embed_flow.bias, model.embed_rgb.bias)
    assert torch.equal(model.pos_embed_flow, model.pos_embed_rgb) and torch.equal(model.cls_flow, model.cls_rgb)
    for k in model.blocks[0]["flow"].state_dict():
        assert torch.equal(model.blocks[0]["flow"].state_dict()[k], model.blocks[0]["rgb"].state_dict()[k])


def test_flow_from_rgb_needs_both():
    from mbt_fast.vit_init import flow_from_rgb

    with pytest.raises(ValueError, match="flow_from_rgb: expected a model with rgb and flow"):
        flow_from_rgb(make_model(config(SETS["M3"][1:])))


def test_scenic_conversion_refuses_modalities_scenic_lacks():
    from mbt_fast.convert import scenic_name_table

    with pytest.raises(ValueError, match="Scenic's MBT has parameters for .* got 'flow'"):
        scenic_name_table(config(SETS["M3"]))


@pytest.mark.parametrize("subset", [("rgb", "flow"), ("tokens",), ("tokens", "spectrogram", "flow")], ids="+".join)
@pytest.mark.parametrize("mode", ["bottleneck", "vanilla", "shared_bottleneck"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_missing_modalities_of_four(backend, mode, subset):
    """``missing="drop"`` with M = 4: the present modalities only, the bottleneck mean over them."""
    skip_unavailable(backend)
    cfg = config(SETS["M4"], **MODES[mode])
    model = make_model(cfg).eval()
    inputs = {m: x for m, x in make_inputs(cfg, batch=3).items() if m in subset}
    with torch.no_grad():
        ref = model.set_backend("reference").forward_per_modality(**inputs, missing="drop")
        out = model.set_backend(backend).forward_per_modality(**inputs, missing="drop")
    assert set(out) == set(ref) == set(subset)
    for m in ref:
        err = (out[m] - ref[m]).abs().max().item()
        assert err <= TOLS[backend][0], f"{mode}/{backend}/{subset} logits[{m}]: {err:.3e} > {TOLS[backend][0]}"


def test_explain_maps_every_modality():
    from mbt_fast.explain import explain

    cfg = config(SETS["M4"])
    expl = explain(make_model(cfg), make_inputs(cfg, 1))
    grids = {m: cfg.patch_grid(m) for m in cfg.modality_fusion}
    assert {m: a.shape for m, a in expl.cls.items()} == grids == {m: a.shape for m, a in expl.bottleneck.items()}


def test_explain_saves_a_flow_map(tmp_path):
    from mbt_fast.explain import explain, save

    cfg = config(SETS["M3"])
    inputs = make_inputs(cfg, 1)
    expl = explain(make_model(cfg), inputs)
    paths = save(tmp_path, [expl], inputs, [f"c{i}" for i in range(cfg.num_classes)], expl.logits, top_k=3)
    assert (tmp_path / "flow_attention.png").stat().st_size > 1000 and tmp_path / "flow_attention.png" in paths
    import numpy as np

    npz = np.load(tmp_path / "attention.npz")
    assert npz["cls_flow"].shape == (1, *cfg.patch_grid("flow"))


# ---- ragged feature sequences: per-sample lengths ------------------------------------------------------

RAGGED_MODES = ["bottleneck", "vanilla", "vanilla_shared", "gap_bottleneck", "late_fusion"]


def _ragged(cfg, seed=7):
    inputs = make_inputs(cfg, batch=3, seed=seed)
    lengths = {"tokens": torch.tensor([5, 2, 3] if cfg.has_cls else [5, 1, 3])}
    return inputs, lengths


def _run_ragged(model, inputs, lengths, backend):
    model.set_backend(backend).zero_grad()
    model.train()
    logits = model.forward_per_modality(**inputs, lengths=lengths)
    w = torch.Generator().manual_seed(5)
    sum((v.float() * torch.randn(v.shape, generator=w)).sum() for v in logits.values()).backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", RAGGED_MODES)
@pytest.mark.parametrize("backend", ["eager_sdpa", "torch", "triton"])
def test_ragged_tokens_match_reference(backend, mode):
    """Lengths 5, 2, 3 (1 without CLS) of 5 feature rows in the M = 4 model: fp32 against the reference."""
    skip_unavailable(backend)
    cfg = config(SETS["M4"], **MODES[mode])
    model = make_model(cfg)
    inputs, lengths = _ragged(cfg)
    ref, ref_grads = _run_ragged(model, inputs, lengths, "reference")
    out, grads = _run_ragged(model, inputs, lengths, backend)
    fwd_tol, bwd_tol = TOLS[backend]
    for m in ref:
        err = (out[m] - ref[m]).abs().max().item()
        assert err <= fwd_tol, f"{mode}/{backend} logits[{m}]: {err:.3e} > {fwd_tol}"
    for n, g in ref_grads.items():
        err = (grads[n] - g).abs().max().item() / max(1.0, g.abs().max().item())
        assert err <= bwd_tol, f"{mode}/{backend} grad {n}: relative error {err:.3e} > {bwd_tol}"


@pytest.mark.parametrize("mode", ["bottleneck", "vanilla"])
def test_ragged_tokens_cuda_emu_bf16(mode):
    skip_unavailable("cuda-emu")
    cfg = config(SETS["M4"], **MODES[mode])
    model = make_model(cfg)
    inputs, lengths = _ragged(cfg)
    ref, ref_grads = _run_ragged(model, inputs, lengths, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_grads = _run_ragged(model, inputs, lengths, "reference")
        out, grads = _run_ragged(model, inputs, lengths, "cuda-emu")
    for m in ref:
        assert_close_2x(out[m].float(), ref[m], low[m].float(), torch.bfloat16, name=f"{mode} logits[{m}]")
    for n, g in ref_grads.items():
        scale = max(1.0, g.abs().max().item())
        assert_close_2x(grads[n] / scale, g / scale, low_grads[n] / scale, torch.bfloat16, backward=True,
                        name=f"{mode} grad {n} (relative)")


@pytest.mark.parametrize("mode", ["bottleneck", "vanilla", "gap_bottleneck"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_padding_rows_do_not_matter(backend, mode):
    """What the padding rows hold changes nothing; full lengths equal no lengths; a shorter length does
    change the answer (the mask is used)."""
    cfg = config(SETS["M4"], **MODES[mode])
    model = make_model(cfg).set_backend(backend).eval()
    inputs, lengths = _ragged(cfg)
    noisy = dict(inputs, tokens=inputs["tokens"].clone())
    for b, n in enumerate(lengths["tokens"].tolist()):
        noisy["tokens"][b, n:] = 100.0 * torch.randn(5 - n, 7)
    with torch.no_grad():
        out = model(**inputs, lengths=lengths)
        torch.testing.assert_close(model(**noisy, lengths=lengths), out, rtol=1e-5, atol=1e-5)
        full = torch.full((3,), 5)
        assert torch.equal(model(**inputs, lengths={"tokens": full}), model(**inputs))
        assert not torch.allclose(out[0], model(**inputs, lengths={"tokens": torch.tensor([4, 2, 3])})[0])


@pytest.mark.parametrize("lengths,error,match", [
    ({"rgb": torch.tensor([1, 1])}, ValueError, r"lengths\['rgb'\]: only sequence modalities"),
    ({"tokens": torch.tensor([1.0, 2.0])}, ValueError, r"lengths\['tokens'\]: expected an integer tensor \[B\] = \[2\]"),
    ({"tokens": torch.tensor([6, 2])}, ValueError, r"expected values in \[0, 5\].*got min 2, max 6"),
    ({"audio": torch.tensor([1, 1])}, ValueError, "'audio' is not one of this model's modalities"),
    ([5, 5], TypeError, "lengths: expected a dict"),
])
def test_bad_lengths(lengths, error, match):
    cfg = config(SETS["M4"])
    model = make_model(cfg).set_backend("torch")
    with pytest.raises(error, match=match):
        model(**make_inputs(cfg, batch=2), lengths=lengths)


def test_lengths_compile_without_graph_breaks():
    """The padding masks are built from the lengths tensors on the device (no host read under compile)."""
    cfg = config(SETS["M4"], num_layers=2)
    model = make_model(cfg).set_backend("torch").eval()
    inputs, lengths = _ragged(cfg)
    compiled = torch.compile(lambda i, n: model(**i, lengths=n), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs, lengths), model(**inputs, lengths=lengths), rtol=1e-5, atol=1e-6)
