"""``mbt_fast.explain`` and ``mbt-fast explain``: the attention maps against a direct computation from
the blocks' weights, the images and arrays written, the backends left as they were, the errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mbt_fast
from mbt_fast import explain as ex
from mbt_fast.cli import main
from mbt_fast.data.testing import write_clip, write_corrupt

# 8x8 patches, 2-frame tubelets: rgb grid (2, 4, 4), spectrogram grid (6, 4)
SHAPES = {"rgb": (-1, 4, 32, 32, 3), "spectrogram": (-1, 48, 32, 3)}


def tiny(**kw) -> mbt_fast.MBT:
    cfg = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=3, fusion_layer=1, n_bottlenecks=2, num_classes=6,
               patches_size=(8, 8, 2), input_shapes=SHAPES)
    cfg.update(kw)
    torch.manual_seed(0)
    model = mbt_fast.MBT(mbt_fast.MBTConfig(**cfg)).eval()
    with torch.no_grad():  # the head is zero-initialised: random weights give distinct classes
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model


def example(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.rand(1, 3, 4, 32, 32, generator=g) * 2 - 1, "spectrogram": torch.randn(1, 48, 32, generator=g)}


def block_inputs(model, layer, inputs):
    """[(block key, the block's input)] for every block call at ``layer`` of the reference encoder."""
    seen, hooks = [], []
    for key, blk in model.blocks[layer].items():
        hooks.append(blk.register_forward_pre_hook(lambda mod, args, key=key: seen.append((key, args[0].detach()))))
    backend = model.backend
    model.set_backend("reference")
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_backend(backend)
        for h in hooks:
            h.remove()
    return seen


def direct_attention(block, x):
    """Head-averaged softmax(q k^T / sqrt(d)) of one block call, from the block's weights: [n, n]."""
    C = x.shape[-1]
    H = block.attn.num_heads
    D = C // H
    h = F.layer_norm(x[0], (C,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias  # rows: q, then k, then v
    q = (h @ w[:C].T + b[:C]).reshape(-1, H, D)
    k = (h @ w[C:2 * C].T + b[C:2 * C]).reshape(-1, H, D)
    a = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(D)
    return a.softmax(-1).mean(0).detach()


def to_grid(row, grid):
    """Patch row (time-major token order) -> grid, by the index formula of Conv3d/Conv2d + flatten."""
    out = np.zeros(grid)
    for idx in np.ndindex(*grid):
        flat = 0
        for i, g in zip(idx, grid):
            flat = flat * g + i
        out[idx] = row[flat]
    return out


# ---- the maps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bottleneck", "vanilla", "vanilla_shared"])
@pytest.mark.parametrize("layer", [0, 2])
def test_maps_match_direct_computation(kind, layer):
    kw = {"bottleneck": {}, "vanilla": dict(use_bottleneck=False),
          "vanilla_shared": dict(use_bottleneck=False, share_encoder=True)}[kind]
    model = tiny(**kw)
    cfg, inputs = model.cfg, example()
    expl = ex.explain(model, inputs, layer=layer)
    assert expl.layer == layer and expl.modalities == ("spectrogram", "rgb")
    torch.testing.assert_close(torch.from_numpy(expl.logits), model(**inputs)[0], rtol=1e-5, atol=1e-5)

    n = {m: cfg.num_tokens(m) for m in cfg.modality_fusion}
    calls = block_inputs(model, layer, inputs)
    if kind == "vanilla_shared" and layer >= cfg.fusion_layer:
        (key, x), = calls  # one joint sequence [spectrogram ; rgb]
        a = direct_attention(model.blocks[layer][key], x)
        per = {"spectrogram": (a, 0), "rgb": (a, n["spectrogram"])}
    else:
        keys = cfg.modality_fusion if kind == "vanilla_shared" else [k for k, _ in calls]
        per = {}
        for m, (key, x) in zip(keys, calls):
            a = direct_attention(model.blocks[layer][key], x)
            other = "rgb" if m == "spectrogram" else "spectrogram"
            fused_vanilla = kind != "bottleneck" and layer >= cfg.fusion_layer
            per[m] = (a, n[other] if fused_vanilla else 0)  # vanilla fusion: context first, own tokens last
    for m, (a, off) in per.items():
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[0]))  # a softmax over all keys
        grid = cfg.patch_grid(m)
        cls_row = a[off, off + 1:off + n[m]].numpy()
        np.testing.assert_allclose(expl.cls[m], to_grid(cls_row, grid), rtol=1e-5, atol=1e-7)
        assert 0 < expl.cls[m].sum() < 1  # the CLS token also attends to itself (and the bottleneck)
        if kind == "bottleneck" and layer >= cfg.fusion_layer:
            assert a.shape[0] == n[m] + cfg.num_bottleneck_tokens  # cat([x_m, bottleneck])
            bott_rows = a[n[m]:, 1:n[m]].mean(0).numpy()
            np.testing.assert_allclose(expl.bottleneck[m], to_grid(bott_rows, grid), rtol=1e-5, atol=1e-7)
        else:
            assert m not in expl.bottleneck
    if not expl.bottleneck:
        assert any("bottleneck" in note for note in expl.notes)


def test_gap_model_has_bottleneck_maps_only():
    model = tiny(classifier="gap")
    expl = ex.explain(model, example())
    assert expl.cls == {} and set(expl.bottleneck) == {"spectrogram", "rgb"}
    assert any("no CLS token" in note for note in expl.notes)
    x = block_inputs(model, 2, example())[1][1]  # the rgb block: cat([rgb patches, bottleneck])
    a = direct_attention(model.blocks[2]["rgb"], x)
    n = model.cfg.num_tokens("rgb")
    np.testing.assert_allclose(expl.bottleneck["rgb"], to_grid(a[n:, :n].mean(0).numpy(), (2, 4, 4)), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"layer: nothing to explain at layer 0.*classifier='gap'.*layer >= 1"):
        ex.explain(model, example(), layer=0)


def test_missing_modality_explains_the_ones_present():
    model = tiny()
    inputs = {"rgb": example()["rgb"]}
    expl = ex.explain(model, inputs)
    assert expl.modalities == ("rgb",) and set(expl.cls) == {"rgb"}
    assert any("spectrogram absent" in note for note in expl.notes)
    torch.testing.assert_close(torch.from_numpy(expl.logits), model(rgb=inputs["rgb"], missing="drop")[0])


def test_maps_follow_the_input():
    model = tiny()
    a, b = ex.explain(model, example(1)), ex.explain(model, example(2))
    assert not np.allclose(a.cls["rgb"], b.cls["rgb"])
    assert not np.allclose(a.bottleneck["spectrogram"], b.bottleneck["spectrogram"])


def test_layer_checked():
    model = tiny()
    assert ex.check_layer(model.cfg, None) == 2 and ex.check_layer(model.cfg, -3) == 0
    for bad in (3, -4):
        with pytest.raises(ValueError, match=rf"layer: expected an index in \[-3, 2\] .*num_layers=3.*got {bad}"):
            ex.explain(model, example(), layer=bad)
    with pytest.raises(ValueError, match=r"rgb: expected one example .*\(2, 3, 4, 32, 32\)"):
        ex.explain(model, {"rgb": torch.cat([example()["rgb"]] * 2)})


def test_other_backends_unchanged_and_hooks_removed():
    model = tiny()
    inputs = example()
    with torch.no_grad():
        before = {b: model.set_backend(b)(**inputs) for b in ("torch", "eager_sdpa", "reference")}
    model.set_backend("torch")
    ex.explain(model, inputs)
    assert model.backend == "torch" and not model.training
    attns = [blk.attn for blocks in model.blocks for blk in blocks.values()]
    assert all(a.record is None for a in attns)
    with torch.no_grad():
        for b, out in before.items():
            assert torch.equal(model.set_backend(b)(**inputs), out), b
    # a failing forward still removes the hooks and restores the backend
    model.set_backend("torch").train()
    with pytest.raises(ValueError, match="spectrogram: expected shape"):
        ex.explain(model, {"rgb": inputs["rgb"], "spectrogram": torch.zeros(1, 40, 32)})
    assert all(a.record is None for a in attns) and model.backend == "torch" and model.training


def test_upsample_maps_each_patch_to_its_pixels():
    grid = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    up = ex.upsample(grid, (8, 4))
    assert up.shape == (2, 24, 16)
    t, y, x = np.meshgrid(np.arange(2), np.arange(24), np.arange(16), indexing="ij")
    np.testing.assert_array_equal(up, grid[t, y // 8, x // 4])


# ---- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    tiny().save_pretrained(d / "model.safetensors")
    write_clip(d / "texture.mp4", seconds=1.0, fps=10, size=(48, 40), audio=True, pattern="texture")
    write_clip(d / "flat.mp4", seconds=1.0, fps=10, size=(48, 40), audio=True, pattern="flat", tone_hz=300.0)
    write_clip(d / "silent.mp4", seconds=1.0, fps=10, size=(48, 40), audio=False, pattern="texture")
    return d


def test_cli_writes_images_and_arrays(files, tmp_path, capsys):
    from mbt_fast import inference

    runs = {}
    for name in ("texture", "flat"):
        out = tmp_path / name
        assert main(["explain", str(files / "model.safetensors"), str(files / f"{name}.mp4"), "--out", str(out),
                     "--top-k", "3"]) == 0
        for png in ("rgb_attention.png", "spectrogram_attention.png", "top_classes.png"):
            data = (out / png).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        runs[name] = (out, dict(np.load(out / "attention.npz")))
    stdout = capsys.readouterr().out
    assert "layer 2, mean over 4 heads, from spectrogram + rgb" in stdout and "wrote " in stdout

    (out, arr), (out2, arr2) = runs["texture"], runs["flat"]
    assert set(arr) >= {"cls_rgb", "bottleneck_rgb", "cls_spectrogram", "bottleneck_spectrogram", "scores", "clip_logits"}
    assert arr["cls_rgb"].shape == (1, 2, 4, 4) and arr["cls_spectrogram"].shape == (1, 6, 4)
    assert int(arr["layer"]) == 2 and list(arr["modalities"]) == ["spectrogram", "rgb"]
    for key in ("cls_rgb", "bottleneck_rgb", "cls_spectrogram", "bottleneck_spectrogram"):
        assert not np.allclose(arr[key], arr2[key]), key  # the maps follow the input
    assert (out / "rgb_attention.png").read_bytes() != (out2 / "rgb_attention.png").read_bytes()

    # the saved numbers are explain()'s on the decoded clip; the chart's scores its softmax
    model = inference.load_model(files / "model.safetensors")
    clip = inference.decode_clip(files / "texture.mp4", model.cfg)
    expl = ex.explain(model, clip.inputs)
    np.testing.assert_allclose(arr["cls_rgb"][0], expl.cls["rgb"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(arr["scores"], torch.from_numpy(expl.logits).softmax(-1).numpy(), rtol=1e-5)
    best = arr["class_names"][np.argmax(arr["scores"])]
    assert f"{arr['scores'].max():.3f}  {best}" in stdout


def test_cli_video_without_audio(files, tmp_path, capsys):
    out = tmp_path / "silent"
    assert main(["explain", str(files / "model.safetensors"), str(files / "silent.mp4"), "--out", str(out),
                 "--num-clips", "2"]) == 0
    assert "from rgb (no audio track" in capsys.readouterr().out
    arr = np.load(out / "attention.npz")
    assert list(arr["modalities"]) == ["rgb"] and arr["cls_rgb"].shape == (2, 2, 4, 4)
    assert "cls_spectrogram" not in arr and not (out / "spectrogram_attention_clip0.png").exists()
    assert (out / "rgb_attention_clip0.png").stat().st_size > 0 and (out / "rgb_attention_clip1.png").stat().st_size > 0


def test_cli_errors(files, tmp_path, capsys):
    model = str(files / "model.safetensors")
    cases = [([str(tmp_path / "missing.mp4")], "missing.mp4: does not exist"),
             ([str(write_corrupt(tmp_path / "corrupt.mp4"))], "corrupt.mp4: not a readable video"),
             ([str(files / "texture.mp4"), "--layer", "3"], "layer: expected an index in [-3, 2]"),
             ([str(files / "texture.mp4"), "--labels", str(tmp_path / "none.txt")], "none.txt: does not exist")]
    for args, message in cases:
        assert main(["explain", model, *args, "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "attention.npz").exists()
