"""Initialise an ``MBT`` from a timm ViT-B/16 ``state_dict``, as Scenic's MBT fine-tuning does.

What is copied (``scenic/projects/mbt/model_utils.initialise_from_train_state``):

* every ViT block into the block of every modality (and the shared block);
* the final ViT ``norm`` into ``encoder_norm``; the head is not restored;
* the patch embedding: central-frame tubelet for RGB (the 2-D kernel at time index ``t // 2``, zeros
  elsewhere), the 2-D kernel as is for the spectrogram (summed over RGB, our spectrogram has one
  channel where Scenic tiles three identical ones);
* positional embeddings: the ViT CLS entry kept; the 14×14 grid bilinearly resized (``order=1``
  zoom, corners aligned) to each RGB frame's grid and tiled over time (``resize_tile``), resized to the
  spectrogram's (time, mel) grid, and resized to the bottleneck count for the ``bottleneck`` tokens;
* the ViT ``cls_token`` into the RGB CLS (or the only CLS of a single-modality model). Scenic looks
  for ``cls_spectrogram``, which never exists, so the spectrogram CLS keeps its zero init; so does ours.

Beyond Scenic: ``flow`` gets the RGB treatment with the kernel averaged over the RGB channels and
replicated over the two flow channels (the cross-modality initialisation of two-stream networks, TSN);
a ``tokens`` or registered modality has no ViT counterpart and keeps its own embedding and positions.
:func:`flow_from_rgb` initialises ``flow`` from an MBT's own RGB stream the same way.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mbt_fast.model import MBT

_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
               "mlp.fc2.weight", "mlp.fc2.bias")


def zoom_bilinear(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``scipy.ndimage.zoom(grid, (gh/h, gw/w, 1), order=1)``: linear interpolation with the corner
    samples aligned (``grid_mode=False``)."""
    h, w, _ = grid.shape

    def axis(n_in, n_out):
        pos = np.zeros(n_out) if n_out == 1 else np.arange(n_out) * ((n_in - 1) / (n_out - 1))
        lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo)[:, None]

    (y0, y1, fy), (x0, x1, fx) = axis(h, out_hw[0]), axis(w, out_hw[1])
    rows = grid[y0] * (1 - fy[:, :, None]) + grid[y1] * fy[:, :, None]  # [gh, w, C]
    return rows[:, x0] * (1 - fx[None]) + rows[:, x1] * fx[None]


def _square_grid(n: int) -> tuple[int, int]:
    gh = int(math.isqrt(n))
    return gh, n // gh


def init_from_vit(model: MBT, state_dict: dict[str, torch.Tensor]) -> MBT:
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    need = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    need += [f"blocks.{i}.{k}" for i in range(cfg.num_layers) for k in _BLOCK_KEYS]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"state_dict: not a timm ViT with >= {cfg.num_layers} blocks; missing {len(missing)} keys: "
                         + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    C = cfg.hidden_size
    if sd["cls_token"].shape[-1] != C:
        raise ValueError(f"state_dict: ViT width {sd['cls_token'].shape[-1]} != hidden_size {C}")
    fh, fw, ft = cfg.patches_size
    if tuple(sd["patch_embed.proj.weight"].shape) != (C, 3, fh, fw):
        raise ValueError(f"patch_embed.proj.weight: expected {(C, 3, fh, fw)}, got {tuple(sd['patch_embed.proj.weight'].shape)}")

    pos = sd["pos_embed"][0].numpy()
    cls_pos, grid = pos[:1], pos[1:]
    gs = math.isqrt(grid.shape[0])
    grid = grid.reshape(gs, gs, C)

    def with_cls(g: np.ndarray) -> torch.Tensor:
        g = g.reshape(-1, C)
        return torch.from_numpy(np.concatenate([cls_pos, g]) if cfg.has_cls else g)[None].float()

    new = {}
    for lyr in range(cfg.num_layers):
        for key in model.blocks[lyr].keys():
            for k in _BLOCK_KEYS:
                new[f"blocks.{lyr}.{key}.{k}"] = sd[f"blocks.{lyr}.{k}"]
    new["encoder_norm.weight"], new["encoder_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    kernel, bias = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    mods = cfg.modality_fusion
    for m in mods:
        g = cfg.patch_grid(m)
        if m in ("rgb", "flow"):
            # flow: two-stream (TSN) cross-modality init, the RGB kernel averaged over its channels
            frame_kernel = kernel if m == "rgb" else kernel.mean(1, keepdim=True).expand(-1, 2, -1, -1)
            w = torch.zeros(C, frame_kernel.shape[1], ft, fh, fw)
            w[:, :, ft // 2] = frame_kernel  # central-frame initialiser
            new[f"embed_{m}.weight"], new[f"embed_{m}.bias"] = w, bias
            frame = zoom_bilinear(grid, g[1:]) if g[1:] != (gs, gs) else grid
            new[f"pos_embed_{m}"] = with_cls(np.tile(frame.reshape(1, -1, C), (g[0], 1, 1)))
        elif m == "spectrogram":
            new["embed_spectrogram.weight"], new["embed_spectrogram.bias"] = kernel.sum(1, keepdim=True), bias
            new["pos_embed_spectrogram"] = with_cls(zoom_bilinear(grid, g))
        if cfg.has_cls and (m == "rgb" or len(mods) == 1):
            new[f"cls_{m}"] = sd["cls_token"].reshape(1, 1, C)
    if model.bottleneck is not None:
        n = model.bottleneck.shape[1] - int(cfg.has_cls)
        new["bottleneck"] = with_cls(zoom_bilinear(grid, _square_grid(n))) if n > 0 else with_cls(grid[:0, :0])
    own = model.state_dict()
    for k, v in new.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: ViT-derived shape {tuple(v.shape)} does not fit the model's {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v)
    return model


def flow_from_rgb(model: MBT, blocks: bool = True) -> MBT:
    """Initialise ``model``'s flow stream from its RGB stream, as two-stream networks do (TSN): the RGB
    tubelet kernel averaged over its 3 channels into each of the 2 flow channels, the bias, positional
    embedding and CLS copied (the grids must match), and with ``blocks`` the RGB encoder blocks copied
    into the flow blocks (no-op with a shared encoder)."""
    mods = model.cfg.modality_fusion
    if "rgb" not in mods or "flow" not in mods:
        raise ValueError(f"flow_from_rgb: expected a model with rgb and flow in modality_fusion, got {mods}")
    own = model.state_dict()
    new = {"embed_flow.weight": model.embed_rgb.weight.mean(1, keepdim=True).expand_as(model.embed_flow.weight),
           "embed_flow.bias": model.embed_rgb.bias, "pos_embed_flow": model.pos_embed_rgb}
    if model.cfg.has_cls:
        new["cls_flow"] = model.cls_rgb
    if blocks and not model.cfg.share_encoder:
        for lyr, blk in enumerate(model.blocks):
            new.update({f"blocks.{lyr}.flow.{k}": v for k, v in blk["rgb"].state_dict().items()})
    for k, v in new.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: the RGB stream's {tuple(v.shape)} does not fit the flow stream's "
                             f"{tuple(own[k].shape)} (flow needs the RGB input's T, H, W)")
    with torch.no_grad():
        for k, v in new.items():
            own[k].copy_(v)
    return model
