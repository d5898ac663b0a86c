"""Segment LayerNorm (Triton): LayerNorm over C with per-modality weights, optionally fused with the
residual add that precedes it.

``out[n, b] = (x[n, b] - mean) * rstd * weight[row_weight[n]] + bias[row_weight[n]]`` on the packed
token-major buffer ``[N, B, C]``, statistics in fp32. With ``residual`` the kernel first forms
``s = x + residual`` (stored in x's dtype, returned for the next residual branch) and normalises ``s``.

Forward: one program per ``BLOCK_R`` flattened rows ``n * B + b``, the whole row in registers
(``BLOCK_C`` = next power of two >= C, masked). Backward: each program walks a contiguous chunk of rows,
writes grad_x and keeps per-modality partial sums of ``dy * xhat`` and ``dy`` in registers; the host
adds the per-program partials with torch (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_C = 8192


def segment_layernorm_ref(x, weight, bias, row_weight, eps: float, residual=None):
    """fp32 reference (same computation as ``mbt_fast.torch_ops.segment_layernorm``)."""
    s = x.float() if residual is None else x.float() + residual.float()
    idx = row_weight.to(x.device).long()
    y = F.layer_norm(s, s.shape[-1:], eps=eps) * weight.float()[idx].unsqueeze(1) + bias.float()[idx].unsqueeze(1)
    return y if residual is None else (y, s)


@triton.jit
def _segment_layernorm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, rw_ptr, out_ptr, s_ptr, mean_ptr, rstd_ptr,
    n_rows, B, C, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened row n * B + b
    cols = tl.arange(0, BLOCK_C)
    rmask = r < n_rows
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    offs = r.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = (x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)  # normalise the stored (rounded) sum, the tensor backward sees
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    mod = tl.load(rw_ptr + r // B, mask=rmask, other=0)
    woffs = mod[:, None] * C + cols[None, :]
    w = tl.load(w_ptr + woffs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + woffs, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w + b
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + r, mean, mask=rmask)
    tl.store(rstd_ptr + r, rstd, mask=rmask)


@triton.jit
def _segment_layernorm_bwd_kernel(
    x_ptr, w_ptr, rw_ptr, mean_ptr, rstd_ptr, g_ptr, gs_ptr, gx_ptr, dw_part_ptr, db_part_ptr,
    n_rows, B, C, rows_per_prog,
    M: tl.constexpr, M_PAD: tl.constexpr, HAS_GS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mods = tl.arange(0, M_PAD)
    acc_w = tl.zeros([M_PAD, BLOCK_C], tl.float32)
    acc_b = tl.zeros([M_PAD, BLOCK_C], tl.float32)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, n_rows)
    for start in range(row0, row_end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        rmask = r < row_end
        mask = rmask[:, None] & cmask[None, :]
        offs = r.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
        mod = tl.load(rw_ptr + r // B, mask=rmask, other=0)
        w = tl.load(w_ptr + mod[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_GS:  # s was also an output: its own gradient adds straight through
            dx += tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx_ptr + offs, dx.to(gx_ptr.dtype.element_ty), mask=mask)
        # rows of one tile may straddle a modality boundary: sort their sums by modality
        for m in tl.static_range(M):
            sel = (mod == m)[:, None]
            pw = tl.sum(tl.where(sel, dy * xhat, 0.0), axis=0)
            pb = tl.sum(tl.where(sel, dy, 0.0), axis=0)
            acc_w += tl.where(mods[:, None] == m, pw[None, :], 0.0)
            acc_b += tl.where(mods[:, None] == m, pb[None, :], 0.0)
    poffs = (pid * M + mods)[:, None] * C + cols[None, :]
    pmask = (mods < M)[:, None] & cmask[None, :]
    tl.store(dw_part_ptr + poffs, acc_w, mask=pmask)
    tl.store(db_part_ptr + poffs, acc_b, mask=pmask)


def _fwd_blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): whole rows, about 2048 elements per tile."""
    block_c = triton.next_power_of_2(C)
    return max(1, 2048 // block_c), block_c, 4 if block_c <= 1024 else 8


def _bwd_blocks(C: int, M: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, M_PAD, num_warps); the partial sums hold 2 * M_PAD * BLOCK_C fp32 values."""
    block_c = triton.next_power_of_2(C)
    m_pad = triton.next_power_of_2(M)
    warps = 4 if m_pad * block_c <= 2048 else 8 if m_pad * block_c <= 8192 else 16
    return max(1, 1024 // block_c), block_c, m_pad, warps


def _num_programs(n_row_blocks: int, device: torch.device) -> int:
    """Backward programs: a few per SM on a GPU, few under the interpreter (each one is slow there)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(n_row_blocks, target))


def _segment_layernorm_fwd(x, weight, bias, row_weight, eps, residual):
    N, B, C = x.shape
    out = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x
    mean = torch.empty(N * B, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_r, block_c, warps = _fwd_blocks(C)
    _segment_layernorm_fwd_kernel[(triton.cdiv(N * B, block_r),)](
        x, residual if residual is not None else x, weight, bias, row_weight, out, s, mean, rstd,
        N * B, B, C, eps, HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out, s, mean, rstd


def _segment_layernorm_bwd(x, weight, row_weight, mean, rstd, g, gs):
    N, B, C = x.shape
    M = weight.shape[0]
    block_r, block_c, m_pad, warps = _bwd_blocks(C, M)
    n_rows = N * B
    programs = _num_programs(triton.cdiv(n_rows, block_r), x.device)
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, block_r), programs) * block_r
    programs = triton.cdiv(n_rows, rows_per_prog)
    gx = torch.empty_like(x)
    dw_part = torch.empty(programs, M, C, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    _segment_layernorm_bwd_kernel[(programs,)](
        x, weight, row_weight, mean, rstd, g, gs if gs is not None else g, gx, dw_part, db_part,
        n_rows, B, C, rows_per_prog, M=M, M_PAD=m_pad, HAS_GS=gs is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return gx, dw_part.sum(0), db_part.sum(0)


# the launchers as torch.library ops (opaque to torch.compile)
@torch.library.custom_op("mbt_fast_triton::segment_layernorm_fwd", mutates_args=())
def _segment_layernorm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, row_weight: torch.Tensor,
                              eps: float, residual: torch.Tensor | None) -> list[torch.Tensor]:
    """``[out, mean, rstd]``, and ``[out, s, mean, rstd]`` with a residual (``s = x + residual``)."""
    out, s, mean, rstd = _segment_layernorm_fwd(x, weight, bias, row_weight, eps, residual)
    return [out, s, mean, rstd] if residual is not None else [out, mean, rstd]


@_segment_layernorm_fwd_op.register_fake
def _(x, weight, bias, row_weight, eps, residual):
    mean = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    out = [torch.empty_like(x), mean, torch.empty_like(mean)]
    return out[:1] + [torch.empty_like(x)] + out[1:] if residual is not None else out


@torch.library.custom_op("mbt_fast_triton::segment_layernorm_bwd", mutates_args=())
def _segment_layernorm_bwd_op(x: torch.Tensor, weight: torch.Tensor, row_weight: torch.Tensor, mean: torch.Tensor,
                              rstd: torch.Tensor, g: torch.Tensor, gs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _segment_layernorm_bwd(x, weight, row_weight, mean, rstd, g, gs)


@_segment_layernorm_bwd_op.register_fake
def _(x, weight, row_weight, mean, rstd, g, gs):
    dw = weight.new_empty(weight.shape, dtype=torch.float32)
    return torch.empty_like(x), dw, torch.empty_like(dw)


class SegmentLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, row_weight, eps, residual):
        outs = torch.ops.mbt_fast_triton.segment_layernorm_fwd(x, weight, bias, row_weight, eps, residual)
        out, s, mean, rstd = outs if residual is not None else (outs[0], x, outs[1], outs[2])
        ctx.save_for_backward(s, weight, row_weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
        if residual is None:
            return out
        return out, s

    @staticmethod
    def backward(ctx, g, gs=None):
        s, weight, row_weight, mean, rstd = ctx.saved_tensors
        gx, dw, db = torch.ops.mbt_fast_triton.segment_layernorm_bwd(
            s, weight, row_weight, mean, rstd, g.contiguous(), gs.contiguous() if gs is not None else None)
        gres = None
        if ctx.res_dtype is not None and ctx.needs_input_grad[5]:
            gres = gx if ctx.res_dtype == gx.dtype else gx.to(ctx.res_dtype)
        return gx, dw.to(weight.dtype), db.to(ctx.bias_dtype), None, None, gres


def segment_layernorm(x, weight, bias, row_weight, eps: float = 1e-6, residual=None):
    """LayerNorm of ``x`` (or of ``s = x + residual``, then returns ``(LN(s), s)``) with the weights of
    row ``n`` taken from ``weight[row_weight[n]]`` / ``bias[row_weight[n]]`` (``[M, C]``)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected [N, B, C], got shape {tuple(x.shape)}")
    N, B, C = x.shape
    if weight.dim() != 2 or weight.shape[1] != C or bias.shape != weight.shape:
        raise ValueError(f"weight, bias: expected two [M, {C}] tensors, got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if C > MAX_C:
        raise ValueError(f"x: expected at most {MAX_C} channels (a row lives in registers), got {C}")
    if row_weight.dtype != torch.int32 or tuple(row_weight.shape) != (N,) or row_weight.device != x.device:
        raise ValueError(f"row_weight: expected int32 [{N}] on {x.device}, got {row_weight.dtype} "
                         f"{tuple(row_weight.shape)} on {row_weight.device}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: expected the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    return SegmentLayerNormFunction.apply(
        x.contiguous(), weight.contiguous(), bias.contiguous(), row_weight.contiguous(), float(eps),
        residual.contiguous() if residual is not None else None)


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs(dtype: torch.dtype) -> list[dict]:
    """AOT specs at MBT-B (C=768, 2 modalities; activations and weights in ``dtype``); the forward is
    the fused-residual variant used between attention and MLP, the backward carries grad_s."""
    p = _PTR[dtype]
    C, M = 768, 2
    fr, fc, fw = _fwd_blocks(C)
    br, bc, mp, bw = _bwd_blocks(C, M)
    fwd = {"x_ptr": p, "res_ptr": p, "w_ptr": p, "b_ptr": p, "rw_ptr": "*i32", "out_ptr": p, "s_ptr": p,
           "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "n_rows": "i32", "B": "i32", "C": "i32", "eps": "fp32"}
    bwd = {"x_ptr": p, "w_ptr": p, "rw_ptr": "*i32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "g_ptr": p,
           "gs_ptr": p, "gx_ptr": p, "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32",
           "n_rows": "i32", "B": "i32", "C": "i32", "rows_per_prog": "i32"}
    return [
        {"kernel": "_segment_layernorm_fwd_kernel", "direction": "fwd", "fn": _segment_layernorm_fwd_kernel, "signature": fwd,
         "constexprs": dict(HAS_RESIDUAL=True, BLOCK_R=fr, BLOCK_C=fc), "num_warps": fw, "num_stages": 1,
         "divisible_by_16": ["C"]},
        {"kernel": "_segment_layernorm_bwd_kernel", "direction": "bwd", "fn": _segment_layernorm_bwd_kernel, "signature": bwd,
         "constexprs": dict(M=M, M_PAD=mp, HAS_GS=True, BLOCK_R=br, BLOCK_C=bc), "num_warps": bw, "num_stages": 1,
         "divisible_by_16": ["C"]},
    ]
