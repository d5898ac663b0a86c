"""Residual add with per-sample stochastic depth and the fused bottleneck mean (Triton).

``out = x + keep[b, m] * y`` on the packed token-major buffer ``[N, B, C]`` (see ``mbt_fast.layout``),
where ``m`` is the modality a row belongs to (a bottleneck slot belongs to the modality it follows).
The bottleneck slot rows then follow ``bottleneck``:

* ``"add"``: like any other row;
* ``"keep"``: stay ``x`` (unimodal layers leave the bottleneck untouched);
* ``"mean"``: every slot gets the mean over modalities of the updated slots (fusion layers).

One launch forward, one launch backward. Programs ``[0, row_blocks)`` of grid axis 0 sweep the flattened
rows ``n * B + b``; in ``"mean"`` mode they skip the slot rows and the programs after them handle the
slots, each loading the same slot row of all ``M`` modalities. Axis 1 tiles the channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mbt_fast.layout import PackedLayout

_MODES = {"add": 0, "keep": 1, "mean": 2}
MAX_MODALITIES = 8


def residual_mean_ref(x, y, keep, layout: PackedLayout, bottleneck: str):
    """fp32 reference: the same computation as ``mbt_fast.torch_ops.residual_mean``, written row by row."""
    x, y = x.float(), y.float()
    B = x.shape[1]
    keep = torch.ones(B, layout.num_modalities, device=x.device) if keep is None else keep.float()
    row_keep = keep.t()[layout.row_weight(x.device).long()]  # [N, B]
    out = x + row_keep.unsqueeze(-1) * y
    if layout.n_bottleneck == 0 or bottleneck == "add":
        return out
    slots = [layout.bottleneck_rows(m) for m in range(layout.num_modalities)]
    mean = sum(out[s] for s in slots) / len(slots)
    out = out.clone()
    for s in slots:
        out[s] = x[s] if bottleneck == "keep" else mean
    return out


@triton.jit
def _row_modality(n, starts_ptr, slot_starts_ptr, NBOT: tl.constexpr, M: tl.constexpr):
    """Modality of token rows ``n`` and whether they are bottleneck slot rows."""
    mod = tl.zeros_like(n)
    for m in tl.static_range(1, M):
        mod += (n >= tl.load(starts_ptr + m)).to(tl.int32)
    slot0 = tl.load(slot_starts_ptr + mod)
    is_slot = (n >= slot0) & (n < slot0 + NBOT)
    return mod, is_slot


@triton.jit
def _slot_mean(x_ptr, y_ptr, keep_ptr, slot_starts_ptr, s, smask, cols, mask, B, C, M: tl.constexpr,
               HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 mean over the ``M`` modalities of ``x + keep * y`` on slot rows ``s`` (indices inside each
    modality's flattened slot range ``[slot_start[m] * B, (slot_start[m] + NBOT) * B)``)."""
    b = s % B
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for m in tl.static_range(M):
        offs = (tl.load(slot_starts_ptr + m).to(tl.int64) * B + s)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_KEEP:
            k = tl.load(keep_ptr + b * M + m, mask=smask, other=0.0)
            acc += x + k[:, None] * y
        else:
            acc += x + y
    return acc * (1.0 / M)


@triton.jit
def _row_keep(keep_ptr, starts_ptr, slot_starts_ptr, r, rmask, B, M: tl.constexpr, NBOT: tl.constexpr,
              MODE: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr):
    """For the flattened rows ``r = n * B + b`` of a row program: the token rows ``n``, which are slot
    rows, the factor of ``y`` (``keep[b, m]``, 0 on slot rows in "keep" mode) and the row mask without
    the slot rows in "mean" mode (their programs are the slot programs)."""
    n = r // B
    b = r - n * B
    mod, is_slot = _row_modality(n, starts_ptr, slot_starts_ptr, NBOT, M)
    if HAS_KEEP:
        k = tl.load(keep_ptr + b * M + mod, mask=rmask, other=0.0)
    else:
        k = tl.full([BLOCK_R], 1.0, tl.float32)
    if MODE == 1:
        k = tl.where(is_slot, 0.0, k)
    if MODE == 2:
        rmask = rmask & (is_slot == 0)
    return n, is_slot, k, rmask


@triton.jit
def _row_residual(x_ptr, y_ptr, keep_ptr, starts_ptr, slot_starts_ptr, r, rmask, cols, cmask, B, C,
                  M: tl.constexpr, NBOT: tl.constexpr, MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """``x + keep[b, m] * y`` (fp32) on the rows of a row program (``_row_keep``), the slot rows left at
    ``x`` in "keep" mode. Returns it with the offsets, the mask, the row mask and the token rows ``n``."""
    n, is_slot, k, rmask = _row_keep(keep_ptr, starts_ptr, slot_starts_ptr, r, rmask, B, M, NBOT, MODE, HAS_KEEP,
                                     BLOCK_R)
    offs = r.to(tl.int64)[:, None] * C + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = x + k[:, None] * y
    if MODE == 1:  # "keep": slot rows are x itself, not x + 0 * y (an inf in y must not become NaN)
        out = tl.where(is_slot[:, None], x, out)
    return out, offs, mask, rmask, n


@triton.jit
def _residual_mean_fwd_kernel(
    x_ptr, y_ptr, keep_ptr, out_ptr, starts_ptr, slot_starts_ptr,
    n_rows, B, C, n_row_blocks,
    M: tl.constexpr, NBOT: tl.constexpr, MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if pid < n_row_blocks:
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened row n * B + b
        out, offs, mask, _, _ = _row_residual(x_ptr, y_ptr, keep_ptr, starts_ptr, slot_starts_ptr, r, r < n_rows,
                                              cols, cmask, B, C, M, NBOT, MODE, HAS_KEEP, BLOCK_R)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # slot program: slot rows of modality m are the contiguous flattened rows
        # [slot_start[m] * B, (slot_start[m] + NBOT) * B); s indexes inside that range
        s = (pid - n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        smask = s < NBOT * B
        mask = smask[:, None] & cmask[None, :]
        mean = _slot_mean(x_ptr, y_ptr, keep_ptr, slot_starts_ptr, s, smask, cols, mask, B, C, M, HAS_KEEP,
                          BLOCK_R, BLOCK_C).to(out_ptr.dtype.element_ty)
        for m in tl.static_range(M):
            offs = (tl.load(slot_starts_ptr + m).to(tl.int64) * B + s)[:, None] * C + cols[None, :]
            tl.store(out_ptr + offs, mean, mask=mask)


@triton.jit
def _residual_mean_bwd_kernel(
    g_ptr, keep_ptr, gx_ptr, gy_ptr, starts_ptr, slot_starts_ptr,
    n_rows, B, C, n_row_blocks,
    M: tl.constexpr, NBOT: tl.constexpr, MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grad_x is written only in "mean" mode; otherwise it is grad_out itself
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if pid < n_row_blocks:
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        _, _, k, smask = _row_keep(keep_ptr, starts_ptr, slot_starts_ptr, r, r < n_rows, B, M, NBOT, MODE, HAS_KEEP,
                                   BLOCK_R)
        offs = r.to(tl.int64)[:, None] * C + cols[None, :]
        mask = smask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gy_ptr + offs, (k[:, None] * g).to(gy_ptr.dtype.element_ty), mask=mask)
        if MODE == 2:
            tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)
    else:
        s = (pid - n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        smask = s < NBOT * B
        b = s % B
        mask = smask[:, None] & cmask[None, :]
        gsum = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for m in tl.static_range(M):
            offs = (tl.load(slot_starts_ptr + m).to(tl.int64) * B + s)[:, None] * C + cols[None, :]
            gsum += tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gmean = gsum * (1.0 / M)  # every slot's output is the mean: each input slot gets 1/M of the sum
        for m in tl.static_range(M):
            offs = (tl.load(slot_starts_ptr + m).to(tl.int64) * B + s)[:, None] * C + cols[None, :]
            tl.store(gx_ptr + offs, gmean.to(gx_ptr.dtype.element_ty), mask=mask)
            if HAS_KEEP:
                k = tl.load(keep_ptr + b * M + m, mask=smask, other=0.0)
                tl.store(gy_ptr + offs, (k[:, None] * gmean).to(gy_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(gy_ptr + offs, gmean.to(gy_ptr.dtype.element_ty), mask=mask)


def _blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): 2048-element tiles, at most 256 channels wide."""
    block_c = min(triton.next_power_of_2(C), 256)
    return max(1, 2048 // block_c), block_c, 4


_TABLES: dict = {}


def _tables(layout: PackedLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 modality starts and slot starts on ``device``, cached so no copy is made per call."""
    key = (layout, str(device))
    if key not in _TABLES:
        starts = torch.tensor(layout.offsets, dtype=torch.int32)
        slot_starts = torch.tensor([layout.bottleneck_rows(m).start for m in range(layout.num_modalities)], dtype=torch.int32)
        _TABLES[key] = (starts.to(device), slot_starts.to(device))
    return _TABLES[key]


def _launch_meta(x, layout, mode):
    N, B, C = x.shape
    block_r, block_c, warps = _blocks(C)
    n_rows = N * B
    n_row_blocks = triton.cdiv(n_rows, block_r)
    slot_blocks = triton.cdiv(layout.n_bottleneck * B, block_r) if mode == 2 else 0
    grid = (n_row_blocks + slot_blocks, triton.cdiv(C, block_c))
    return grid, (n_rows, B, C, n_row_blocks), dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)


def _residual_mean_fwd(x, y, keep, layout: PackedLayout, mode: int):
    out = torch.empty_like(x)
    starts, slot_starts = _tables(layout, x.device)
    grid, ints, meta = _launch_meta(x, layout, mode)
    _residual_mean_fwd_kernel[grid](
        x, y, keep if keep is not None else x, out, starts, slot_starts, *ints,
        M=layout.num_modalities, NBOT=layout.n_bottleneck, MODE=mode, HAS_KEEP=keep is not None, **meta)
    return out


def _residual_mean_bwd(g, keep, layout: PackedLayout, mode: int, y_dtype: torch.dtype):
    gy = torch.empty(g.shape, dtype=y_dtype, device=g.device)
    gx = torch.empty_like(g) if mode == 2 else g
    starts, slot_starts = _tables(layout, g.device)
    grid, ints, meta = _launch_meta(g, layout, mode)
    _residual_mean_bwd_kernel[grid](
        g, keep if keep is not None else g, gx, gy, starts, slot_starts, *ints,
        M=layout.num_modalities, NBOT=layout.n_bottleneck, MODE=mode, HAS_KEEP=keep is not None, **meta)
    return gx, gy


# the launchers as torch.library ops (opaque to torch.compile; the layout travels as its row counts)
def _layout(tokens: list[int], n_bottleneck: int) -> PackedLayout:
    return PackedLayout(tuple(f"m{i}" for i in range(len(tokens))), tuple(tokens), n_bottleneck)


@torch.library.custom_op("mbt_fast_triton::residual_mean_fwd", mutates_args=())
def _residual_mean_fwd_op(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None, tokens: list[int],
                          n_bottleneck: int, mode: int) -> torch.Tensor:
    return _residual_mean_fwd(x, y, keep, _layout(tokens, n_bottleneck), mode)


@_residual_mean_fwd_op.register_fake
def _(x, y, keep, tokens, n_bottleneck, mode):
    return torch.empty_like(x)


@torch.library.custom_op("mbt_fast_triton::residual_mean_bwd", mutates_args=())
def _residual_mean_bwd_op(g: torch.Tensor, keep: torch.Tensor | None, tokens: list[int], n_bottleneck: int, mode: int,
                          y_dtype: torch.dtype) -> list[torch.Tensor]:
    """``[gy]``, and ``[gx, gy]`` in "mean" mode (otherwise gx is ``g`` itself, and an op's output may not
    alias its input)."""
    gx, gy = _residual_mean_bwd(g, keep, _layout(tokens, n_bottleneck), mode, y_dtype)
    return [gx, gy] if mode == 2 else [gy]


@_residual_mean_bwd_op.register_fake
def _(g, keep, tokens, n_bottleneck, mode, y_dtype):
    gy = torch.empty(g.shape, dtype=y_dtype, device=g.device)
    return [torch.empty_like(g), gy] if mode == 2 else [gy]


class ResidualMeanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, keep, layout, mode):
        ctx.save_for_backward(keep)
        ctx.layout, ctx.mode, ctx.y_dtype = layout, mode, y.dtype
        return torch.ops.mbt_fast_triton.residual_mean_fwd(x, y, keep, list(layout.tokens), layout.n_bottleneck, mode)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        g = g.contiguous()
        grads = torch.ops.mbt_fast_triton.residual_mean_bwd(g, keep, list(ctx.layout.tokens), ctx.layout.n_bottleneck,
                                                            ctx.mode, ctx.y_dtype)
        gx, gy = grads if ctx.mode == 2 else (g, grads[0])
        return gx, gy, None, None, None  # keep is a sampled mask: no gradient


def residual_mean(x, y, keep, layout: PackedLayout, bottleneck: str = "add"):
    """``x + keep[b, m] * y`` with the bottleneck rows per ``bottleneck`` (contract: ``mbt_fast.ops``)."""
    if bottleneck not in _MODES:
        raise ValueError(f"bottleneck: expected one of {tuple(_MODES)}, got {bottleneck!r}")
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(f"x, y: expected two equal [N, B, C] shapes, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.shape[0] != layout.total_rows:
        raise ValueError(f"x: expected {layout.total_rows} rows for {layout}, got {x.shape[0]}")
    if not 1 <= layout.num_modalities <= MAX_MODALITIES:
        raise ValueError(f"layout: expected 1 to {MAX_MODALITIES} modalities, got {layout.num_modalities}")
    if keep is not None:
        if tuple(keep.shape) != (x.shape[1], layout.num_modalities):
            raise ValueError(f"keep: expected shape {(x.shape[1], layout.num_modalities)}, got {tuple(keep.shape)}")
        keep = keep.detach().to(torch.float32).contiguous()
    mode = 0 if layout.n_bottleneck == 0 else _MODES[bottleneck]
    return ResidualMeanFunction.apply(x.contiguous(), y.contiguous(), keep, layout, mode)


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs(dtype: torch.dtype) -> list[dict]:
    """Ahead-of-time compile specs at the MBT-B configuration (C=768, 2 modalities, 5 bottleneck rows),
    fusion-layer ("mean") mode with a stochastic-depth mask, the shape the training step runs."""
    block_r, block_c, warps = _blocks(768)
    p = _PTR[dtype]
    ints = {"n_rows": "i32", "B": "i32", "C": "i32", "n_row_blocks": "i32"}
    const = dict(M=2, NBOT=5, MODE=2, HAS_KEEP=True, BLOCK_R=block_r, BLOCK_C=block_c)
    fwd = {"x_ptr": p, "y_ptr": p, "keep_ptr": "*fp32", "out_ptr": p, "starts_ptr": "*i32", "slot_starts_ptr": "*i32", **ints}
    bwd = {"g_ptr": p, "keep_ptr": "*fp32", "gx_ptr": p, "gy_ptr": p, "starts_ptr": "*i32", "slot_starts_ptr": "*i32", **ints}
    common = {"constexprs": const, "num_warps": warps, "num_stages": 1, "divisible_by_16": ["C"]}
    return [
        {"kernel": "_residual_mean_fwd_kernel", "direction": "fwd", "fn": _residual_mean_fwd_kernel, "signature": fwd, **common},
        {"kernel": "_residual_mean_bwd_kernel", "direction": "bwd", "fn": _residual_mean_bwd_kernel, "signature": bwd, **common},
    ]
