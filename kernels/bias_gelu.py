"""Bias + tanh-approximate GELU (Triton): the fused epilogue of the MLP's first Linear.

``out[n, b] = gelu_tanh(x[n, b] + bias[row_weight[n]])`` on the packed token-major buffer ``[N, B, F]``
with per-modality biases ``[M, F]``; fp32 math in registers.

Forward: a 2-D grid of ``BLOCK_R`` flattened rows x ``BLOCK_F`` features. Backward recomputes the GELU
from x and the bias (nothing but the inputs is saved); each program walks a contiguous chunk of rows for
one feature block and keeps per-modality partial sums of grad_bias in registers, added on the host with
torch (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl



def bias_gelu_ref(x, bias, row_weight):
    """fp32 reference (same computation as ``mbt_fast.torch_ops.bias_gelu``)."""
    idx = row_weight.to(x.device).long()
    return F.gelu(x.float() + bias.float()[idx].unsqueeze(1), approximate="tanh")


@triton.jit
def _gelu_tanh_inner(u):
    """tanh(sqrt(2/pi) * (u + 0.044715 u^3)), tanh from exp (no libdevice, so the interpreter runs it
    too); exp(-2|z|) never overflows and saturates cleanly to +-1."""
    z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, bias_ptr, rw_ptr, out_ptr, n_rows, B, F,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened row n * B + b
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = r < n_rows
    mask = rmask[:, None] & (cols < F)[None, :]
    offs = r.to(tl.int64)[:, None] * F + cols[None, :]
    mod = tl.load(rw_ptr + r // B, mask=rmask, other=0)
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(bias_ptr + mod[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = _gelu_tanh_inner(u)
    tl.store(out_ptr + offs, (0.5 * u * (1.0 + t)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    x_ptr, bias_ptr, rw_ptr, g_ptr, gx_ptr, db_part_ptr, n_rows, B, F, rows_per_prog,
    M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    mods = tl.arange(0, M_PAD)
    acc = tl.zeros([M_PAD, BLOCK_F], tl.float32)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, n_rows)
    for start in range(row0, row_end, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        rmask = r < row_end
        mask = rmask[:, None] & cmask[None, :]
        offs = r.to(tl.int64)[:, None] * F + cols[None, :]
        mod = tl.load(rw_ptr + r // B, mask=rmask, other=0)
        u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u += tl.load(bias_ptr + mod[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = _gelu_tanh_inner(u)
        dgelu = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * u * u)
        du = g * dgelu  # masked entries are 0 because g is
        tl.store(gx_ptr + offs, du.to(gx_ptr.dtype.element_ty), mask=mask)
        # rows of one tile may straddle a modality boundary: sort their sums by modality
        for m in tl.static_range(M):
            part = tl.sum(tl.where((mod == m)[:, None], du, 0.0), axis=0)
            acc += tl.where(mods[:, None] == m, part[None, :], 0.0)
    poffs = (pid * M + mods)[:, None] * F + cols[None, :]
    tl.store(db_part_ptr + poffs, acc, mask=(mods < M)[:, None] & cmask[None, :])


def _blocks(F: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_F, num_warps): 2048-element tiles, at most 256 features wide."""
    block_f = min(triton.next_power_of_2(F), 256)
    return max(1, 2048 // block_f), block_f, 4


def _num_programs(n_row_blocks: int, col_blocks: int, device: torch.device) -> int:
    """Row chunks of the backward: enough programs to fill the GPU a few times, few when interpreting."""
    if device.type == "cuda":
        target = max(1, 4 * torch.cuda.get_device_properties(device).multi_processor_count // col_blocks)
    else:
        target = 4
    return max(1, min(n_row_blocks, target))


def _bias_gelu_fwd(x, bias, row_weight):
    N, B, F = x.shape
    out = torch.empty_like(x)
    block_r, block_f, warps = _blocks(F)
    grid = (triton.cdiv(N * B, block_r), triton.cdiv(F, block_f))
    _bias_gelu_fwd_kernel[grid](x, bias, row_weight, out, N * B, B, F, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=warps)
    return out


def _bias_gelu_bwd(x, bias, row_weight, g):
    N, B, F = x.shape
    M = bias.shape[0]
    block_r, block_f, warps = _blocks(F)
    n_rows, col_blocks = N * B, triton.cdiv(F, block_f)
    programs = _num_programs(triton.cdiv(n_rows, block_r), col_blocks, x.device)
    rows_per_prog = triton.cdiv(triton.cdiv(n_rows, block_r), programs) * block_r
    programs = triton.cdiv(n_rows, rows_per_prog)
    gx = torch.empty_like(x)
    db_part = torch.empty(programs, M, F, dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(programs, col_blocks)](
        x, bias, row_weight, g, gx, db_part, n_rows, B, F, rows_per_prog,
        M=M, M_PAD=triton.next_power_of_2(M), BLOCK_R=block_r, BLOCK_F=block_f, num_warps=warps)
    return gx, db_part.sum(0)


# the launchers as torch.library ops (opaque to torch.compile)
@torch.library.custom_op("mbt_fast_triton::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: torch.Tensor, bias: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    return _bias_gelu_fwd(x, bias, row_weight)


@_bias_gelu_fwd_op.register_fake
def _(x, bias, row_weight):
    return torch.empty_like(x)


@torch.library.custom_op("mbt_fast_triton::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(x: torch.Tensor, bias: torch.Tensor, row_weight: torch.Tensor,
                      g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _bias_gelu_bwd(x, bias, row_weight, g)


@_bias_gelu_bwd_op.register_fake
def _(x, bias, row_weight, g):
    return torch.empty_like(x), bias.new_empty(bias.shape, dtype=torch.float32)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, row_weight):
        ctx.save_for_backward(x, bias, row_weight)
        return torch.ops.mbt_fast_triton.bias_gelu_fwd(x, bias, row_weight)

    @staticmethod
    def backward(ctx, g):
        x, bias, row_weight = ctx.saved_tensors
        gx, db = torch.ops.mbt_fast_triton.bias_gelu_bwd(x, bias, row_weight, g.contiguous())
        return gx, db.to(bias.dtype), None


def bias_gelu(x, bias, row_weight):
    """tanh-GELU of ``x + bias[row_weight[n]]`` (contract: ``mbt_fast.ops``)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected [N, B, F], got shape {tuple(x.shape)}")
    N, B, F = x.shape
    if bias.dim() != 2 or bias.shape[1] != F:
        raise ValueError(f"bias: expected [M, {F}], got shape {tuple(bias.shape)}")
    if row_weight.dtype != torch.int32 or tuple(row_weight.shape) != (N,) or row_weight.device != x.device:
        raise ValueError(f"row_weight: expected int32 [{N}] on {x.device}, got {row_weight.dtype} "
                         f"{tuple(row_weight.shape)} on {row_weight.device}")
    return BiasGeluFunction.apply(x.contiguous(), bias.contiguous(), row_weight.contiguous())


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs(dtype: torch.dtype) -> list[dict]:
    """AOT specs at MBT-B: MLP width 3072, 2 modalities."""
    p = _PTR[dtype]
    block_r, block_f, warps = _blocks(3072)
    ints = {"n_rows": "i32", "B": "i32", "F": "i32"}
    fwd = {"x_ptr": p, "bias_ptr": p, "rw_ptr": "*i32", "out_ptr": p, **ints}
    bwd = {"x_ptr": p, "bias_ptr": p, "rw_ptr": "*i32", "g_ptr": p, "gx_ptr": p, "db_part_ptr": "*fp32", **ints,
           "rows_per_prog": "i32"}
    return [
        {"kernel": "_bias_gelu_fwd_kernel", "direction": "fwd", "fn": _bias_gelu_fwd_kernel, "signature": fwd,
         "constexprs": dict(BLOCK_R=block_r, BLOCK_F=block_f), "num_warps": warps, "num_stages": 1,
         "divisible_by_16": ["F"]},
        {"kernel": "_bias_gelu_bwd_kernel", "direction": "bwd", "fn": _bias_gelu_bwd_kernel, "signature": bwd,
         "constexprs": dict(M=2, M_PAD=2, BLOCK_R=block_r, BLOCK_F=block_f), "num_warps": warps, "num_stages": 1,
         "divisible_by_16": ["F"]},
    ]
