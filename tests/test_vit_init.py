"""ViT initialisation from a timm ViT-B/16-shaped state dict (random, built here; no download)."""
import dataclasses

import numpy as np
import pytest
import torch

import mbt_fast
from mbt_fast.config import MBTConfig
from mbt_fast.vit_init import zoom_bilinear

CFG = MBTConfig(hidden_size=48, num_heads=2, mlp_dim=64, num_layers=2, fusion_layer=1, n_bottlenecks=4, num_classes=3,
                input_shapes={"rgb": (-1, 4, 64, 64, 3), "spectrogram": (-1, 96, 32, 3)})


def timm_vit_state_dict(C=48, depth=3, mlp=64, grid=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, C), "pos_embed": r(1, grid * grid + 1, C), "patch_embed.proj.weight": r(C, 3, 16, 16),
          "patch_embed.proj.bias": r(C), "norm.weight": r(C), "norm.bias": r(C), "head.weight": r(1000, C), "head.bias": r(1000)}
    for i in range(depth):
        for k, s in {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
                     "attn.proj.weight": (C, C), "attn.proj.bias": (C,), "norm2.weight": (C,), "norm2.bias": (C,),
                     "mlp.fc1.weight": (mlp, C), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (C, mlp), "mlp.fc2.bias": (C,)}.items():
            sd[f"blocks.{i}.{k}"] = r(*s)
    return sd


def test_init_from_vit_maps_every_piece():
    sd = timm_vit_state_dict()
    model = mbt_fast.init_from_vit(mbt_fast.MBT(CFG), sd)
    C = 48
    for lyr in range(CFG.num_layers):
        for m in CFG.modality_fusion:
            assert torch.equal(model.blocks[lyr][m].attn.qkv.weight, sd[f"blocks.{lyr}.attn.qkv.weight"])
            assert torch.equal(model.blocks[lyr][m].mlp.fc2.bias, sd[f"blocks.{lyr}.mlp.fc2.bias"])
    assert torch.equal(model.encoder_norm.weight, sd["norm.weight"])
    # central-frame tubelet: the 2-D kernel at t // 2 = 1, zeros at t = 0
    assert torch.equal(model.embed_rgb.weight[:, :, 1], sd["patch_embed.proj.weight"])
    assert model.embed_rgb.weight[:, :, 0].abs().max() == 0
    torch.testing.assert_close(model.embed_spectrogram.weight[:, 0], sd["patch_embed.proj.weight"].sum(1))
    # RGB pos-emb: CLS entry, then the 14x14 grid resized to 4x4 per frame and tiled over 2 frames
    pos, grid = sd["pos_embed"][0, :1], sd["pos_embed"][0, 1:].reshape(14, 14, C).numpy()
    frame = torch.from_numpy(zoom_bilinear(grid, (4, 4)).reshape(16, C)).float()
    assert torch.equal(model.pos_embed_rgb[0, 0:1], pos)
    torch.testing.assert_close(model.pos_embed_rgb[0, 1:17], frame)
    torch.testing.assert_close(model.pos_embed_rgb[0, 17:33], frame)
    # spectrogram pos-emb: the grid zoomed to (96/16, 32/16) = (6, 2); bottleneck: zoomed to 2x2 + CLS entry
    torch.testing.assert_close(model.pos_embed_spectrogram[0, 1:], torch.from_numpy(zoom_bilinear(grid, (6, 2)).reshape(12, C)).float())
    assert model.bottleneck.shape == (1, 5, C)
    torch.testing.assert_close(model.bottleneck[0, 1:], torch.from_numpy(zoom_bilinear(grid, (2, 2)).reshape(4, C)).float())
    # Scenic's quirk kept: only the RGB CLS comes from the ViT
    assert torch.equal(model.cls_rgb, sd["cls_token"]) and model.cls_spectrogram.abs().max() == 0
    with torch.no_grad():
        out = model(rgb=torch.zeros(1, 3, 4, 64, 64), spectrogram=torch.zeros(1, 96, 32))
    assert out.shape == (1, 3)


def test_zoom_matches_scipy():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(0).standard_normal((14, 14, 3))
    for hw in [(50, 8), (2, 2), (1, 3), (7, 20)]:
        np.testing.assert_allclose(zoom_bilinear(grid, hw), scipy_ndimage.zoom(grid, (hw[0] / 14, hw[1] / 14, 1), order=1), atol=1e-12)


def test_init_from_vit_rejects_mismatch():
    with pytest.raises(ValueError, match="missing"):
        mbt_fast.init_from_vit(mbt_fast.MBT(CFG), timm_vit_state_dict(depth=1))
    with pytest.raises(ValueError, match="ViT width 64 != hidden_size 48"):
        mbt_fast.init_from_vit(mbt_fast.MBT(CFG), timm_vit_state_dict(C=64))


def test_shared_and_single_modality():
    sd = timm_vit_state_dict()
    shared = mbt_fast.init_from_vit(mbt_fast.MBT(dataclasses.replace(CFG, share_encoder=True)), sd)
    assert torch.equal(shared.blocks[0]["shared"].norm1.weight, sd["blocks.0.norm1.weight"])
    spec = mbt_fast.init_from_vit(mbt_fast.MBT(dataclasses.replace(CFG, modality_fusion=("spectrogram",))), sd)
    assert torch.equal(spec.cls_spectrogram, sd["cls_token"])  # Scenic names the only CLS 'cls'


def test_init_from_vit_gives_flow_the_channel_averaged_kernel_and_leaves_tokens_alone():
    """Two-stream (TSN) cross-modality init for flow; a feature sequence has no ViT counterpart."""
    cfg = dataclasses.replace(CFG, modality_fusion=("spectrogram", "rgb", "flow", "tokens"),
                              input_shapes={**CFG.input_shapes, "flow": (-1, 4, 32, 48, 2), "tokens": (-1, 5, 7)})
    sd = timm_vit_state_dict()
    torch.manual_seed(0)
    fresh = mbt_fast.MBT(cfg)
    tokens_before = {k: v.clone() for k, v in fresh.state_dict().items() if "tokens" in k and "blocks" not in k}
    model = mbt_fast.init_from_vit(fresh, sd)
    kernel = sd["patch_embed.proj.weight"].mean(1, keepdim=True).expand(-1, 2, -1, -1)
    torch.testing.assert_close(model.embed_flow.weight[:, :, 1], kernel)
    assert model.embed_flow.weight[:, :, 0].abs().max() == 0 and torch.equal(model.embed_flow.bias, sd["patch_embed.proj.bias"])
    assert model.pos_embed_flow.shape == (1, 1 + 2 * 2 * 3, 48)  # the ViT grid zoomed to the flow's 2 x 3 frames
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tokens_before.items())
    assert torch.equal(model.blocks[0]["tokens"].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
