"""Plain-PyTorch implementations of the fused ops: the ``torch`` backend.

Same contracts as the kernels (see ``mbt_fast.ops``); autograd comes from PyTorch itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mbt_fast.layout import PackedLayout


def mbt_attention(q, k, v, segments: tuple, scale: float, dropout_p: float = 0.0, key_mask=None):
    """``segments``: validated ``(q_start, q_end, k_start, k_end)`` int rows (see ``mbt_fast.ops``);
    ``key_mask``: None or bool ``[B, Nk]``."""
    pieces, row = [], 0
    for qs, qe, ks, ke in sorted(segments):
        if qs > row:  # rows in no segment output zeros
            pieces.append(q.new_zeros(qs - row, *q.shape[1:]))
        # [n, B, H, D] -> [B, H, n, D] views; SDPA picks flash/efficient/math by device (a mask rules out flash)
        mask = None if key_mask is None else key_mask[:, None, None, ks:ke]
        o = F.scaled_dot_product_attention(
            q[qs:qe].permute(1, 2, 0, 3), k[ks:ke].permute(1, 2, 0, 3), v[ks:ke].permute(1, 2, 0, 3),
            attn_mask=mask, dropout_p=dropout_p, scale=scale)
        pieces.append(o.permute(2, 0, 1, 3))
        row = qe
    if row < q.shape[0]:
        pieces.append(q.new_zeros(q.shape[0] - row, *q.shape[1:]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def residual_mean(x, y, keep, layout: PackedLayout, bottleneck: str):
    y = y.to(x.dtype)
    if keep is None:
        out = x + y
    else:  # the [N, B] row mask from the modalities' row ranges: no index table, no gather
        keep = keep.to(x.dtype)
        row_keep = torch.cat([keep[:, m].expand(e - s, -1) for s, e, m in layout.row_segments()])
        out = torch.addcmul(x, y, row_keep.unsqueeze(-1))
    if layout.n_bottleneck == 0 or bottleneck == "add":
        return out
    slots = [layout.bottleneck_rows(m) for m in range(layout.num_modalities)]
    # the slot rows are written in place into the fresh output (no copy of the buffer per slot)
    if bottleneck == "keep":
        for s in slots:
            out[s] = x[s]
    else:  # mean
        mean = torch.stack([out[s] for s in slots]).mean(0)
        for s in slots:
            out[s] = mean
    return out


def segment_layernorm(x, weight, bias, row_weight, eps: float, segments: tuple | None = None):
    """``segments`` (validated ``(start, end, m)`` rows matching ``row_weight``): one affine LayerNorm per
    segment, as ``nn.LayerNorm`` runs it, instead of per-row gathers of the weight and bias tables."""
    if segments is not None:
        pieces = [F.layer_norm(x[s:e], x.shape[-1:], weight[m].to(x.dtype), bias[m].to(x.dtype), eps)
                  for s, e, m in sorted(segments)]  # concatenated in row order, whatever order they came in
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    idx = row_weight.to(x.device).long()
    return y * weight[idx].unsqueeze(1).to(y.dtype) + bias[idx].unsqueeze(1).to(y.dtype)


def residual_mean_layernorm(x, y, keep, layout: PackedLayout, bottleneck: str, weight, bias, row_weight, eps: float,
                            segments: tuple | None = None):
    """``(x_new, h)``: the two ops above in sequence; under ``torch.compile`` Inductor fuses them."""
    x_new = residual_mean(x, y, keep, layout, bottleneck)
    return x_new, segment_layernorm(x_new, weight, bias, row_weight, eps, segments)


def bias_gelu(x, bias, row_weight):
    idx = row_weight.to(x.device).long()
    return F.gelu(x + bias[idx].unsqueeze(1).to(x.dtype), approximate="tanh")
