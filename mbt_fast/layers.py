"""Scenic's encoder block, and the same block run over the packed buffer through ``mbt_fast.ops``.

``EncoderBlock.forward`` is the reference: Scenic's ``EncoderBlock`` line by line on one modality's
``[B, n, C]`` tokens. ``packed_block`` runs the blocks of every modality at once on the packed,
token-major ``[N, B, C]`` buffer with the fused ops; both read the same parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mbt_fast import ops
from mbt_fast.layout import PackedLayout

LN_EPS = 1e-6  # Flax's LayerNorm default


class Attention(nn.Module):
    """Multi-head self-attention with Scenic's q, k, v, out projections (q, k, v fused in one Linear)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_drop = num_heads, dim // num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # mbt_fast.explain sets this to a callable taking the [B, heads, n, n] softmax; checked only in
        # the line-by-line branch below, so the fused paths never pay for it
        self.record = None

    def forward(self, x, sdpa: bool = False, key_mask=None):
        """``key_mask``: None or bool ``[B, N]``, False on padding keys (ragged modalities)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if sdpa:  # the eager_sdpa baseline: what a timm-style port writes
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0)
            return self.proj(o.transpose(1, 2).reshape(B, N, C))
        q = q / math.sqrt(self.head_dim)  # Flax scales the query before the dot product
        scores = q @ k.transpose(-2, -1)
        attn = (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(dim=-1)
        if self.record is not None:
            self.record(attn)
        attn = F.dropout(attn, self.attn_drop, self.training)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), drop

    def forward(self, x):
        x = F.dropout(F.gelu(self.fc1(x), approximate="tanh"), self.drop, self.training)
        return F.dropout(self.fc2(x), self.drop, self.training)


def drop_pattern(batch: int, p: float, training: bool, device) -> torch.Tensor | None:
    """Per-example stochastic depth: 1 keeps the branch, 0 drops it; no 1/(1-p) rescale (Scenic)."""
    if not training or p <= 0:
        return None
    return (torch.rand(batch, device=device) >= p).float()


class EncoderBlock(nn.Module):
    """Scenic's pre-LN ``EncoderBlock``; ``sdpa=True`` runs its attention through
    ``F.scaled_dot_product_attention`` (the ``eager_sdpa`` baseline), otherwise line by line."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0, attn_drop: float = 0.0,
                 droplayer_p: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.dropout, self.droplayer_p = dropout, droplayer_p

    def forward(self, inputs, sdpa: bool = False, key_mask=None):
        x = F.dropout(self.attn(self.norm1(inputs), sdpa, key_mask), self.dropout, self.training)
        keep = drop_pattern(inputs.shape[0], self.droplayer_p, self.training, inputs.device)
        x = inputs + (x if keep is None else x * keep[:, None, None])
        y = self.mlp(self.norm2(x))
        keep = drop_pattern(inputs.shape[0], self.droplayer_p, self.training, inputs.device)
        return x + (y if keep is None else y * keep[:, None, None])


# ---- the packed path -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerPlan:
    """How one layer runs over the packed buffer."""

    segments: tuple[tuple[int, int, int, int], ...]  # attention key ranges
    bottleneck: str  # residual mode of the block's closing add: "keep" | "mean" | "add"
    cross_weights: bool = False  # vanilla fusion: keys/values of every row under each modality's weights


def _stack(blocks, get):
    return torch.stack([get(b) for b in blocks])


def _keep(blocks, batch, training, device, shared_draw: bool):
    """``[B, M]`` stochastic-depth mask; one draw for all modalities when they share one block call."""
    p = blocks[0].droplayer_p
    if not training or p <= 0:
        return None
    cols = 1 if shared_draw else len(blocks)
    keep = (torch.rand(batch, cols, device=device) >= p).float()
    return keep.expand(batch, len(blocks)) if shared_draw else keep


def packed_block(blocks: list[EncoderBlock], x: torch.Tensor, layout: PackedLayout, plan: LayerPlan,
                 row_weight: torch.Tensor, backend: str, shared_draw: bool = False, key_mask=None, *,
                 h: torch.Tensor | None = None, next_blocks: list[EncoderBlock] | None = None):
    """One encoder layer for every modality: ``blocks[m]`` holds modality ``m``'s weights; ``key_mask``
    (bool ``[B, N]`` or None): padding rows no query attends to.

    Chaining blocks (the model does): ``next_blocks``, the next layer's blocks, makes the closing residual
    also compute their ``norm1`` of the new x in the same op, and the block returns ``(x, h_next)``
    instead of x; ``h`` passes that ``norm1`` of x to the next block. A ``cross_weights`` layer normalises
    every row under each modality's weights itself: it takes no ``h``, and no block prepares one for it."""
    if h is not None and plan.cross_weights:
        raise ValueError("h: a cross_weights layer normalises x under every modality's weights; expected None")
    N, B, C = x.shape
    blk0 = blocks[0]
    H, D = blk0.attn.num_heads, blk0.attn.head_dim
    rows = layout.row_segments()
    training = blk0.training
    first_mode = "add" if plan.bottleneck in ("mean", "add") else "keep"
    attn_drop = blk0.attn.attn_drop if training else 0.0

    qkv_w, qkv_b = [b.attn.qkv.weight for b in blocks], [b.attn.qkv.bias for b in blocks]
    if plan.cross_weights:
        # Scenic's vanilla fusion runs each modality's block over [other modalities ; own]: the keys and
        # values of every row come from the target modality's LayerNorm and projections.
        qs, ks, vs = [], [], []
        M = len(blocks)
        for m, blk in enumerate(blocks):
            # modality m's LayerNorm on every row: its weights repeated for the model's row table
            hm = ops.segment_layernorm(x, blk.norm1.weight.expand(M, -1).contiguous(),
                                       blk.norm1.bias.expand(M, -1).contiguous(), row_weight, LN_EPS, segments=rows,
                                       backend=backend)
            q, k, v = ops.segment_linear(hm, [qkv_w[m]], [qkv_b[m]], [(0, N, 0)]).view(N, B, 3, H, D).unbind(2)
            qs.append(q[layout.block_rows(m)])
            ks.append(k)
            vs.append(v)
        o = ops.mbt_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), plan.segments, dropout_p=attn_drop,
                              key_mask=None if key_mask is None else key_mask.repeat(1, M), backend=backend)
    else:
        if h is None:
            h = ops.segment_layernorm(x, _stack(blocks, lambda b: b.norm1.weight), _stack(blocks, lambda b: b.norm1.bias),
                                      row_weight, LN_EPS, segments=rows, backend=backend)
        qkv = ops.segment_linear(h, qkv_w, qkv_b, rows).view(N, B, 3, H, D)
        o = ops.mbt_attention_qkv(qkv, plan.segments, dropout_p=attn_drop, key_mask=key_mask, backend=backend)
    y = ops.segment_linear(o.reshape(N, B, C), [b.attn.proj.weight for b in blocks],
                           [b.attn.proj.bias for b in blocks], rows)
    y = F.dropout(y, blk0.dropout, training)
    # the attention's closing residual and norm2 in one op: the add already holds every row
    x, h = ops.residual_mean_layernorm(x, y, _keep(blocks, B, training, x.device, shared_draw), layout, first_mode,
                                       _stack(blocks, lambda b: b.norm2.weight), _stack(blocks, lambda b: b.norm2.bias),
                                       row_weight, LN_EPS, segments=rows, backend=backend)
    h = ops.linear_bias_gelu(h, [b.mlp.fc1.weight for b in blocks], [b.mlp.fc1.bias for b in blocks], rows, row_weight,
                             backend=backend)
    h = F.dropout(h, blk0.dropout, training)
    y = ops.segment_linear(h, [b.mlp.fc2.weight for b in blocks], [b.mlp.fc2.bias for b in blocks], rows)
    y = F.dropout(y, blk0.dropout, training)
    keep = _keep(blocks, B, training, x.device, shared_draw)
    if next_blocks is None:
        return ops.residual_mean(x, y, keep, layout, plan.bottleneck, backend=backend)
    return ops.residual_mean_layernorm(x, y, keep, layout, plan.bottleneck, _stack(next_blocks, lambda b: b.norm1.weight),
                                       _stack(next_blocks, lambda b: b.norm1.bias), row_weight, LN_EPS, segments=rows,
                                       backend=backend)
