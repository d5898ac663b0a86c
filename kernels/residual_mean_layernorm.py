"""Residual + bottleneck mean, then the next segment LayerNorm, in one kernel (Triton).

``x_new = residual_mean(x, y, keep, layout, bottleneck)`` and ``h = segment_layernorm(x_new, weight, bias,
row_weight, eps)`` (see ``kernels/residual_mean.py`` and ``kernels/segment_layernorm.py``) from one pass:
the residual add already holds every row in registers, so the LayerNorm reads no second copy of x_new.

Forward: programs ``[0, row_blocks)`` take ``BLOCK_R`` whole flattened rows ``n * B + b`` each (``BLOCK_C``
= next power of two >= C): residual add with the stochastic-depth keep, store x_new in x's dtype, then
normalise that stored (rounded) row with fp32 statistics, as the two-op composition does. In ``"mean"``
mode they skip the bottleneck slot rows; the programs after them each take ``BLOCK_R`` slot rows of all
``M`` modalities at once: the mean of the updated slots is one row, so its statistics are computed once
and only the affine part differs per modality.

Backward: one launch. Per row, the LayerNorm backward of grad_h plus grad_x_new gives the gradient of
x_new in fp32; that is the residual's gradient (``gx``, and ``keep * it`` for ``gy``), except the slot rows
in ``"mean"`` mode, whose ``M`` gradients are summed and handed 1/M each. Programs walk contiguous row
chunks (slot chunks for the slot programs) and keep per-weight partial sums of grad_weight / grad_bias
in registers; the host adds the partials with torch (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mbt_fast.kernels.residual_mean import (MAX_MODALITIES, _MODES, _row_keep, _row_residual, _slot_mean, _tables,
                                           residual_mean_ref)
from mbt_fast.kernels.segment_layernorm import MAX_C, segment_layernorm_ref
from mbt_fast.layout import PackedLayout


def residual_mean_layernorm_ref(x, y, keep, layout: PackedLayout, bottleneck: str, weight, bias, row_weight, eps: float):
    """fp32 reference: the two references composed (x_new is not rounded before the LayerNorm here)."""
    x_new = residual_mean_ref(x, y, keep, layout, bottleneck)
    return x_new, segment_layernorm_ref(x_new, weight, bias, row_weight, eps)


@triton.jit
def _ln_row_stats(s, mask, C, eps):
    """fp32 mean, centred rows (0 outside ``mask``) and rstd of the ``[R, BLOCK_C]`` tile ``s``."""
    mean = tl.sum(s, axis=1) / C
    sc = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sc * sc, axis=1) / C + eps)
    return mean, sc, rstd


@triton.jit
def _residual_mean_layernorm_fwd_kernel(
    x_ptr, y_ptr, keep_ptr, w_ptr, b_ptr, rw_ptr, xo_ptr, h_ptr, mean_ptr, rstd_ptr, starts_ptr, slot_starts_ptr,
    n_rows, B, C, eps, n_row_blocks,
    M: tl.constexpr, NBOT: tl.constexpr, MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if pid < n_row_blocks:
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened row n * B + b
        out, offs, mask, rmask, n = _row_residual(x_ptr, y_ptr, keep_ptr, starts_ptr, slot_starts_ptr, r,
                                                  r < n_rows, cols, cmask, B, C, M, NBOT, MODE, HAS_KEEP, BLOCK_R)
        out = out.to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + offs, out, mask=mask)
        # normalise the stored (rounded) x_new: the tensor the composition normalises and backward sees
        mean, sc, rstd = _ln_row_stats(out.to(tl.float32), mask, C, eps)
        wrow = tl.load(rw_ptr + n, mask=rmask, other=0)
        woffs = wrow[:, None] * C + cols[None, :]
        w = tl.load(w_ptr + woffs, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + woffs, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, (sc * rstd[:, None] * w + bias).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + r, mean, mask=rmask)
        tl.store(rstd_ptr + r, rstd, mask=rmask)
    else:
        # slot program: slot rows of modality m are the contiguous flattened rows
        # [slot_start[m] * B, (slot_start[m] + NBOT) * B); s indexes inside that range
        s = (pid - n_row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        smask = s < NBOT * B
        mask = smask[:, None] & cmask[None, :]
        out = _slot_mean(x_ptr, y_ptr, keep_ptr, slot_starts_ptr, s, smask, cols, mask, B, C, M, HAS_KEEP,
                         BLOCK_R, BLOCK_C).to(xo_ptr.dtype.element_ty)
        mean, sc, rstd = _ln_row_stats(out.to(tl.float32), mask, C, eps)  # the same row in every slot
        xhat = sc * rstd[:, None]
        for m in tl.static_range(M):
            n0 = tl.load(slot_starts_ptr + m)
            rs = n0.to(tl.int64) * B + s  # flattened rows of modality m's slots
            offs = rs[:, None] * C + cols[None, :]
            tl.store(xo_ptr + offs, out, mask=mask)
            woffs = tl.load(rw_ptr + n0 + s // B, mask=smask, other=0)[:, None] * C + cols[None, :]
            w = tl.load(w_ptr + woffs, mask=mask, other=0.0).to(tl.float32)
            bias = tl.load(b_ptr + woffs, mask=mask, other=0.0).to(tl.float32)
            tl.store(h_ptr + offs, (xhat * w + bias).to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(mean_ptr + rs, mean, mask=smask)
            tl.store(rstd_ptr + rs, rstd, mask=smask)


@triton.jit
def _ln_row_grad(xo_ptr, gh_ptr, gxo_ptr, w_ptr, rw_ptr, mean_ptr, rstd_ptr, r, n, rmask, cols, mask, C,
                 HAS_GXO: tl.constexpr):
    """For rows ``r`` (token rows ``n``): the gradient of x_new (LayerNorm backward of grad_h, plus grad_x_new),
    the partial-sum terms ``dy * xhat`` and ``dy`` (0 outside ``mask``), and the rows' weight index."""
    offs = r.to(tl.int64)[:, None] * C + cols[None, :]
    xo = tl.load(xo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
    wrow = tl.load(rw_ptr + n, mask=rmask, other=0)
    w = tl.load(w_ptr + wrow[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (xo - mean[:, None]) * rstd[:, None], 0.0)
    wdy = w * dy
    c1 = tl.sum(xhat * wdy, axis=1) / C
    c2 = tl.sum(wdy, axis=1) / C
    d = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_GXO:  # x_new is an output too: its own gradient adds straight through
        d += tl.load(gxo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return d, dy * xhat, dy, wrow


@triton.jit
def _residual_mean_layernorm_bwd_kernel(
    xo_ptr, gh_ptr, gxo_ptr, w_ptr, rw_ptr, mean_ptr, rstd_ptr, keep_ptr, starts_ptr, slot_starts_ptr,
    gx_ptr, gy_ptr, dw_part_ptr, db_part_ptr,
    n_rows, B, C, rows_per_prog, slots_per_prog, n_row_progs,
    M: tl.constexpr, NBOT: tl.constexpr, MODE: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_GXO: tl.constexpr,
    MW: tl.constexpr, MW_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    wsets = tl.arange(0, MW_PAD)
    acc_w = tl.zeros([MW_PAD, BLOCK_C], tl.float32)
    acc_b = tl.zeros([MW_PAD, BLOCK_C], tl.float32)
    if pid < n_row_progs:
        row0 = pid * rows_per_prog
        row_end = tl.minimum(row0 + rows_per_prog, n_rows)
        for start in range(row0, row_end, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            # "keep" slot rows are x itself (y gets nothing); "mean" slot rows belong to the slot programs
            n, _, k, rmask = _row_keep(keep_ptr, starts_ptr, slot_starts_ptr, r, r < row_end, B, M, NBOT, MODE,
                                       HAS_KEEP, BLOCK_R)
            mask = rmask[:, None] & cmask[None, :]
            d, pw, pb, wrow = _ln_row_grad(xo_ptr, gh_ptr, gxo_ptr, w_ptr, rw_ptr, mean_ptr, rstd_ptr, r, n, rmask,
                                           cols, mask, C, HAS_GXO)
            offs = r.to(tl.int64)[:, None] * C + cols[None, :]
            tl.store(gx_ptr + offs, d.to(gx_ptr.dtype.element_ty), mask=mask)
            tl.store(gy_ptr + offs, (k[:, None] * d).to(gy_ptr.dtype.element_ty), mask=mask)
            # rows of one tile may straddle a weight boundary: sort their sums by weight index
            for m in tl.static_range(MW):
                sel = (wrow == m)[:, None]
                acc_w += tl.where(wsets[:, None] == m, tl.sum(tl.where(sel, pw, 0.0), axis=0)[None, :], 0.0)
                acc_b += tl.where(wsets[:, None] == m, tl.sum(tl.where(sel, pb, 0.0), axis=0)[None, :], 0.0)
    else:
        s0 = (pid - n_row_progs) * slots_per_prog
        s_end = tl.minimum(s0 + slots_per_prog, NBOT * B)
        for start in range(s0, s_end, BLOCK_R):
            s = start + tl.arange(0, BLOCK_R)
            smask = s < s_end
            b = s % B
            mask = smask[:, None] & cmask[None, :]
            gsum = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            for m in tl.static_range(M):
                n = tl.load(slot_starts_ptr + m) + s // B
                r = n * B + b
                d, pw, pb, wrow = _ln_row_grad(xo_ptr, gh_ptr, gxo_ptr, w_ptr, rw_ptr, mean_ptr, rstd_ptr, r, n,
                                               smask, cols, mask, C, HAS_GXO)
                gsum += d
                for j in tl.static_range(MW):
                    sel = (wrow == j)[:, None]
                    acc_w += tl.where(wsets[:, None] == j, tl.sum(tl.where(sel, pw, 0.0), axis=0)[None, :], 0.0)
                    acc_b += tl.where(wsets[:, None] == j, tl.sum(tl.where(sel, pb, 0.0), axis=0)[None, :], 0.0)
            gmean = gsum * (1.0 / M)  # every slot's x_new is the mean: each input slot gets 1/M of the sum
            for m in tl.static_range(M):
                offs = (tl.load(slot_starts_ptr + m).to(tl.int64) * B + s)[:, None] * C + cols[None, :]
                tl.store(gx_ptr + offs, gmean.to(gx_ptr.dtype.element_ty), mask=mask)
                if HAS_KEEP:
                    k = tl.load(keep_ptr + b * M + m, mask=smask, other=0.0)
                    tl.store(gy_ptr + offs, (k[:, None] * gmean).to(gy_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(gy_ptr + offs, gmean.to(gy_ptr.dtype.element_ty), mask=mask)
    poffs = (pid * MW + wsets)[:, None] * C + cols[None, :]
    pmask = (wsets < MW)[:, None] & cmask[None, :]
    tl.store(dw_part_ptr + poffs, acc_w, mask=pmask)
    tl.store(db_part_ptr + poffs, acc_b, mask=pmask)


def _fwd_blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): whole rows, about 2048 elements per tile (segment_layernorm's)."""
    block_c = triton.next_power_of_2(C)
    return max(1, 2048 // block_c), block_c, 4 if block_c <= 1024 else 8


def _bwd_blocks(C: int, MW: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, MW_PAD, num_warps); the partial sums hold 2 * MW_PAD * BLOCK_C fp32 values."""
    block_c = triton.next_power_of_2(C)
    mw_pad = triton.next_power_of_2(MW)
    warps = 4 if mw_pad * block_c <= 2048 else 8 if mw_pad * block_c <= 8192 else 16
    return max(1, 1024 // block_c), block_c, mw_pad, warps


def _num_programs(n_blocks: int, device: torch.device) -> int:
    """Backward programs: a few per SM on a GPU, few under the interpreter (each one is slow there)."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(n_blocks, target))


def _chunks(n: int, block_r: int, programs: int) -> tuple[int, int]:
    """(items per program, a multiple of ``block_r``; programs needed) to cover ``n`` items."""
    per_prog = triton.cdiv(triton.cdiv(n, block_r), programs) * block_r
    return per_prog, triton.cdiv(n, per_prog)


def _residual_mean_layernorm_fwd(x, y, keep, weight, bias, row_weight, layout: PackedLayout, mode: int, eps: float):
    N, B, C = x.shape
    x_new, h = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(N * B, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    starts, slot_starts = _tables(layout, x.device)
    block_r, block_c, warps = _fwd_blocks(C)
    n_row_blocks = triton.cdiv(N * B, block_r)
    slot_blocks = triton.cdiv(layout.n_bottleneck * B, block_r) if mode == 2 else 0
    _residual_mean_layernorm_fwd_kernel[(n_row_blocks + slot_blocks,)](
        x, y, keep if keep is not None else x, weight, bias, row_weight, x_new, h, mean, rstd, starts, slot_starts,
        N * B, B, C, eps, n_row_blocks, M=layout.num_modalities, NBOT=layout.n_bottleneck, MODE=mode,
        HAS_KEEP=keep is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return x_new, h, mean, rstd


def _residual_mean_layernorm_bwd(gh, gxo, x_new, weight, row_weight, mean, rstd, keep, layout: PackedLayout, mode: int,
                                 y_dtype: torch.dtype):
    N, B, C = x_new.shape
    MW = weight.shape[0]
    block_r, block_c, mw_pad, warps = _bwd_blocks(C, MW)
    rows_per_prog, row_progs = _chunks(N * B, block_r, _num_programs(triton.cdiv(N * B, block_r), x_new.device))
    n_slots = layout.n_bottleneck * B if mode == 2 else 0
    slots_per_prog, slot_progs = (_chunks(n_slots, block_r, _num_programs(triton.cdiv(n_slots, block_r), x_new.device))
                                  if n_slots else (block_r, 0))
    programs = row_progs + slot_progs
    gx = torch.empty_like(x_new)
    gy = torch.empty(x_new.shape, dtype=y_dtype, device=x_new.device)
    dw_part = torch.empty(programs, MW, C, dtype=torch.float32, device=x_new.device)
    db_part = torch.empty_like(dw_part)
    starts, slot_starts = _tables(layout, x_new.device)
    _residual_mean_layernorm_bwd_kernel[(programs,)](
        x_new, gh, gxo if gxo is not None else gh, weight, row_weight, mean, rstd, keep if keep is not None else mean,
        starts, slot_starts, gx, gy, dw_part, db_part,
        N * B, B, C, rows_per_prog, slots_per_prog, row_progs,
        M=layout.num_modalities, NBOT=layout.n_bottleneck, MODE=mode, HAS_KEEP=keep is not None,
        HAS_GXO=gxo is not None, MW=MW, MW_PAD=mw_pad, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return gx, gy, dw_part.sum(0), db_part.sum(0)


# the launchers as torch.library ops (opaque to torch.compile; the layout travels as its row counts)
def _layout(tokens: list[int], n_bottleneck: int) -> PackedLayout:
    return PackedLayout(tuple(f"m{i}" for i in range(len(tokens))), tuple(tokens), n_bottleneck)


@torch.library.custom_op("mbt_fast_triton::residual_mean_layernorm_fwd", mutates_args=())
def _residual_mean_layernorm_fwd_op(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor,
                                    bias: torch.Tensor, row_weight: torch.Tensor, tokens: list[int], n_bottleneck: int,
                                    mode: int, eps: float) -> list[torch.Tensor]:
    """``[x_new, h, mean, rstd]`` (fp32 statistics of x_new's rows, for the backward)."""
    return list(_residual_mean_layernorm_fwd(x, y, keep, weight, bias, row_weight, _layout(tokens, n_bottleneck), mode,
                                             eps))


@_residual_mean_layernorm_fwd_op.register_fake
def _(x, y, keep, weight, bias, row_weight, tokens, n_bottleneck, mode, eps):
    mean = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return [torch.empty_like(x), torch.empty_like(x), mean, torch.empty_like(mean)]


@torch.library.custom_op("mbt_fast_triton::residual_mean_layernorm_bwd", mutates_args=())
def _residual_mean_layernorm_bwd_op(gh: torch.Tensor, gxo: torch.Tensor | None, x_new: torch.Tensor,
                                    weight: torch.Tensor, row_weight: torch.Tensor, mean: torch.Tensor,
                                    rstd: torch.Tensor, keep: torch.Tensor | None, tokens: list[int], n_bottleneck: int,
                                    mode: int, y_dtype: torch.dtype) -> list[torch.Tensor]:
    """``[gx, gy, dw, db]`` (dw, db in fp32); ``gxo`` None: x_new's own gradient is zero (autograd always
    passes one)."""
    return list(_residual_mean_layernorm_bwd(gh, gxo, x_new, weight, row_weight, mean, rstd, keep,
                                             _layout(tokens, n_bottleneck), mode, y_dtype))


@_residual_mean_layernorm_bwd_op.register_fake
def _(gh, gxo, x_new, weight, row_weight, mean, rstd, keep, tokens, n_bottleneck, mode, y_dtype):
    dw = weight.new_empty(weight.shape, dtype=torch.float32)
    return [torch.empty_like(x_new), torch.empty(x_new.shape, dtype=y_dtype, device=x_new.device), dw,
            torch.empty_like(dw)]


class ResidualMeanLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, keep, weight, bias, row_weight, layout, mode, eps):
        x_new, h, mean, rstd = torch.ops.mbt_fast_triton.residual_mean_layernorm_fwd(
            x, y, keep, weight, bias, row_weight, list(layout.tokens), layout.n_bottleneck, mode, eps)
        ctx.save_for_backward(x_new, weight, row_weight, mean, rstd, keep)
        ctx.layout, ctx.mode, ctx.y_dtype, ctx.bias_dtype = layout, mode, y.dtype, bias.dtype
        return x_new, h

    @staticmethod
    def backward(ctx, gxo, gh):
        x_new, weight, row_weight, mean, rstd, keep = ctx.saved_tensors  # an unused output's grad comes as zeros
        gx, gy, dw, db = torch.ops.mbt_fast_triton.residual_mean_layernorm_bwd(
            gh.contiguous(), gxo.contiguous(), x_new, weight, row_weight, mean, rstd,
            keep, list(ctx.layout.tokens), ctx.layout.n_bottleneck, ctx.mode, ctx.y_dtype)
        # keep is a sampled mask and row_weight a table: no gradient
        return gx, gy, None, dw.to(weight.dtype), db.to(ctx.bias_dtype), None, None, None, None


def residual_mean_layernorm(x, y, keep, layout: PackedLayout, bottleneck: str, weight, bias, row_weight,
                            eps: float = 1e-6):
    """``(x_new, h)``: ``x_new = residual_mean(x, y, keep, layout, bottleneck)`` and ``h`` its segment LayerNorm
    under ``weight[row_weight[n]]`` / ``bias[row_weight[n]]`` (contract: ``mbt_fast.ops``)."""
    if bottleneck not in _MODES:
        raise ValueError(f"bottleneck: expected one of {tuple(_MODES)}, got {bottleneck!r}")
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(f"x, y: expected two equal [N, B, C] shapes, got {tuple(x.shape)}, {tuple(y.shape)}")
    N, B, C = x.shape
    if N != layout.total_rows:
        raise ValueError(f"x: expected {layout.total_rows} rows for {layout}, got {N}")
    if not 1 <= layout.num_modalities <= MAX_MODALITIES:
        raise ValueError(f"layout: expected 1 to {MAX_MODALITIES} modalities, got {layout.num_modalities}")
    if C > MAX_C:
        raise ValueError(f"x: expected at most {MAX_C} channels (a row lives in registers), got {C}")
    if weight.dim() != 2 or weight.shape[1] != C or bias.shape != weight.shape:
        raise ValueError(f"weight, bias: expected two [M, {C}] tensors, got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if row_weight.dtype != torch.int32 or tuple(row_weight.shape) != (N,) or row_weight.device != x.device:
        raise ValueError(f"row_weight: expected int32 [{N}] on {x.device}, got {row_weight.dtype} "
                         f"{tuple(row_weight.shape)} on {row_weight.device}")
    if keep is not None:
        if tuple(keep.shape) != (B, layout.num_modalities):
            raise ValueError(f"keep: expected shape {(B, layout.num_modalities)}, got {tuple(keep.shape)}")
        keep = keep.detach().to(torch.float32).contiguous()
    mode = 0 if layout.n_bottleneck == 0 else _MODES[bottleneck]
    return ResidualMeanLayerNormFunction.apply(x.contiguous(), y.contiguous(), keep, weight.contiguous(),
                                               bias.contiguous(), row_weight.contiguous(), layout, mode, float(eps))


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs(dtype: torch.dtype) -> list[dict]:
    """AOT specs at MBT-B (C=768, 2 modalities, 5 bottleneck rows; activations and weights in ``dtype``),
    fusion-layer ("mean") mode with a stochastic-depth mask; the backward carries grad_x_new."""
    p = _PTR[dtype]
    C, M = 768, 2
    fr, fc, fw = _fwd_blocks(C)
    br, bc, mp, bw = _bwd_blocks(C, M)
    tables = {"starts_ptr": "*i32", "slot_starts_ptr": "*i32"}
    fwd = {"x_ptr": p, "y_ptr": p, "keep_ptr": "*fp32", "w_ptr": p, "b_ptr": p, "rw_ptr": "*i32", "xo_ptr": p, "h_ptr": p,
           "mean_ptr": "*fp32", "rstd_ptr": "*fp32", **tables,
           "n_rows": "i32", "B": "i32", "C": "i32", "eps": "fp32", "n_row_blocks": "i32"}
    bwd = {"xo_ptr": p, "gh_ptr": p, "gxo_ptr": p, "w_ptr": p, "rw_ptr": "*i32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
           "keep_ptr": "*fp32", **tables, "gx_ptr": p, "gy_ptr": p, "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32",
           "n_rows": "i32", "B": "i32", "C": "i32", "rows_per_prog": "i32", "slots_per_prog": "i32",
           "n_row_progs": "i32"}
    common = {"num_stages": 1, "divisible_by_16": ["C"]}
    return [
        {"kernel": "_residual_mean_layernorm_fwd_kernel", "direction": "fwd", "fn": _residual_mean_layernorm_fwd_kernel,
         "signature": fwd, "constexprs": dict(M=M, NBOT=5, MODE=2, HAS_KEEP=True, BLOCK_R=fr, BLOCK_C=fc),
         "num_warps": fw, **common},
        {"kernel": "_residual_mean_layernorm_bwd_kernel", "direction": "bwd", "fn": _residual_mean_layernorm_bwd_kernel,
         "signature": bwd, "constexprs": dict(M=M, NBOT=5, MODE=2, HAS_KEEP=True, HAS_GXO=True, MW=M, MW_PAD=mp,
                                              BLOCK_R=br, BLOCK_C=bc), "num_warps": bw, **common},
    ]
