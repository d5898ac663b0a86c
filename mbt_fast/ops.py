"""The fused ops of mbt_fast and their dispatch by backend.

Modules call these functions and never a kernel. Every op has one contract, implemented by
``mbt_fast.torch_ops`` (backend ``torch``), ``mbt_fast.kernels.<op>`` (Triton, backend ``triton``) and
``mbt_fast.cuda_ext`` (CUDA, backends ``cuda`` and ``cuda-emu``). All tensors are token-major
(``[N, B, ...]``, see ``mbt_fast.layout``).

* ``mbt_attention(q, k, v, segments)``: q ``[Nq, B, H, D]``, k/v ``[Nk, B, H, D]``; queries in
  ``[q_start, q_end)`` of each segment attend to keys ``[k_start, k_end)``, softmax scale
  ``1/sqrt(D)`` unless given; rows in no segment return 0.
* ``residual_mean(x, y, keep, layout, bottleneck)``: ``x + keep[b, m] * y`` (``keep`` ``[B, M]``
  per-sample stochastic-depth mask without rescale, or None); the bottleneck rows then follow
  ``bottleneck``: ``"add"`` like any row, ``"keep"`` stay ``x`` (unimodal layers), ``"mean"`` become
  the mean over modalities of their updated slots, written to every slot (fusion layers).
* ``segment_layernorm(x, weight, bias, row_weight, eps)``: LayerNorm over C with the weights of row
  ``n`` taken from ``weight[row_weight[n]]`` (``[M, C]``), fp32 statistics.
* ``bias_gelu(x, bias, row_weight)``: tanh-GELU of ``x + bias[row_weight[n]]``.
* ``segment_linear(x, weights, biases, segments)``: one GEMM per row segment (cuBLAS on every
  backend), written in place into one output buffer.
"""
from __future__ import annotations

import contextlib
import math

import torch

from mbt_fast import torch_ops
from mbt_fast.layout import PackedLayout

_FAST = ("torch", "triton", "cuda", "cuda-emu")
_BOTTLENECK_MODES = ("add", "keep", "mean")


def _check_backend(backend: str):
    if backend not in _FAST:
        raise ValueError(f"backend: expected one of {_FAST} for a packed op, got {backend!r}")


def _check_tensor(name: str, t, ndim: int, like: torch.Tensor | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")


def _segments(segments, nq: int, nk: int) -> torch.Tensor:
    seg = torch.as_tensor(segments, dtype=torch.int32).reshape(-1, 4).cpu()
    if seg.numel() == 0:
        raise ValueError("segments: expected at least one (q_start, q_end, k_start, k_end) row, got none")
    for qs, qe, ks, ke in seg.tolist():
        if not (0 <= qs < qe <= nq and 0 <= ks < ke <= nk):
            raise ValueError(f"segments: row {(qs, qe, ks, ke)} is empty or outside q rows [0, {nq}) / k rows [0, {nk})")
    order = seg[seg[:, 0].argsort()]
    if (order[1:, 0] < order[:-1, 1]).any():
        raise ValueError(f"segments: query ranges must not overlap, got {seg.tolist()}")
    return seg


def mbt_attention(q, k, v, segments, *, scale: float | None = None, dropout_p: float = 0.0, backend: str = "torch"):
    _check_backend(backend)
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4, q)
    _check_tensor("v", v, 4, q)
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, k, v: expected [Nq, B, H, D] and two equal [Nk, B, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    seg = _segments(segments, q.shape[0], k.shape[0])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "torch":
        return torch_ops.mbt_attention(q, k, v, seg, scale, dropout_p)
    if dropout_p > 0:
        raise ValueError(f"dropout_p: the {backend} attention kernel has no attention dropout, got {dropout_p}; use backend='torch'")
    if backend == "triton":
        from mbt_fast.kernels.attention import mbt_attention as kernel
        return kernel(q, k, v, seg, scale)
    from mbt_fast import cuda_ext
    return cuda_ext.mbt_attention(q, k, v, seg, scale, emulated=backend == "cuda-emu")


def residual_mean(x, y, keep, layout: PackedLayout, bottleneck: str = "add", *, backend: str = "torch"):
    _check_backend(backend)
    _check_tensor("x", x, 3)
    _check_tensor("y", y, 3, x)
    if y.shape != x.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[0] != layout.total_rows:
        raise ValueError(f"x: expected {layout.total_rows} rows for {layout}, got {x.shape[0]}")
    if bottleneck not in _BOTTLENECK_MODES:
        raise ValueError(f"bottleneck: expected one of {_BOTTLENECK_MODES}, got {bottleneck!r}")
    if keep is not None:
        _check_tensor("keep", keep, 2, x)
        if tuple(keep.shape) != (x.shape[1], layout.num_modalities):
            raise ValueError(f"keep: expected shape {(x.shape[1], layout.num_modalities)}, got {tuple(keep.shape)}")
    if backend == "torch":
        return torch_ops.residual_mean(x, y, keep, layout, bottleneck)
    if backend == "triton":
        from mbt_fast.kernels.residual_mean import residual_mean as kernel
        return kernel(x, y, keep, layout, bottleneck)
    from mbt_fast import cuda_ext
    return cuda_ext.residual_mean(x, y, keep, layout, bottleneck, emulated=backend == "cuda-emu")


def _check_row_weight(row_weight, x, table):
    if not isinstance(row_weight, torch.Tensor) or row_weight.dtype != torch.int32 or row_weight.shape != (x.shape[0],):
        raise ValueError(f"row_weight: expected an int32 tensor of shape ({x.shape[0]},), got "
                         f"{getattr(row_weight, 'dtype', type(row_weight).__name__)} {tuple(getattr(row_weight, 'shape', ()))}")
    if table.shape[-1] != x.shape[-1]:
        raise ValueError(f"weights: expected last dimension {x.shape[-1]}, got shape {tuple(table.shape)}")


def segment_layernorm(x, weight, bias, row_weight, eps: float = 1e-6, *, backend: str = "torch"):
    _check_backend(backend)
    _check_tensor("x", x, 3)
    _check_tensor("weight", weight, 2, x)
    _check_tensor("bias", bias, 2, x)
    _check_row_weight(row_weight, x, weight)
    if backend == "torch":
        return torch_ops.segment_layernorm(x, weight, bias, row_weight, eps)
    if backend == "triton":
        from mbt_fast.kernels.segment_layernorm import segment_layernorm as kernel
        return kernel(x, weight, bias, row_weight.to(x.device), eps)
    from mbt_fast import cuda_ext
    return cuda_ext.segment_layernorm(x, weight, bias, row_weight, eps, emulated=backend == "cuda-emu")


def bias_gelu(x, bias, row_weight, *, backend: str = "torch"):
    _check_backend(backend)
    _check_tensor("x", x, 3)
    _check_tensor("bias", bias, 2, x)
    _check_row_weight(row_weight, x, bias)
    if backend == "torch":
        return torch_ops.bias_gelu(x, bias, row_weight)
    if backend == "triton":
        from mbt_fast.kernels.bias_gelu import bias_gelu as kernel
        return kernel(x, bias, row_weight.to(x.device))
    from mbt_fast import cuda_ext
    return cuda_ext.bias_gelu(x, bias, row_weight, emulated=backend == "cuda-emu")


class SegmentLinearFunction(torch.autograd.Function):
    """``out[s:e] = x[s:e] @ W_m.T + b_m`` per row segment, each GEMM writing straight into ``out``."""

    @staticmethod
    def forward(ctx, x, segments, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        N, B, _ = x.shape
        out = x.new_empty(N, B, weights[0].shape[0])
        x2, o2 = x.reshape(N * B, -1), out.view(N * B, -1)
        for s, e, m in segments:
            if biases:
                torch.addmm(biases[m], x2[s * B:e * B], weights[m].t(), out=o2[s * B:e * B])
            else:
                torch.mm(x2[s * B:e * B], weights[m].t(), out=o2[s * B:e * B])
        ctx.save_for_backward(x, *weights)
        ctx.segments, ctx.has_bias = segments, bool(biases)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        N, B, _ = x.shape
        g2, x2 = grad_out.reshape(N * B, -1), x.reshape(N * B, -1)
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        gw = [None if w is None else torch.zeros_like(w) for w in weights]
        gb = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for w in weights] if ctx.has_bias else []
        for s, e, m in ctx.segments:
            gs = g2[s * B:e * B]
            if grad_x is not None:
                torch.mm(gs, weights[m], out=grad_x.view(N * B, -1)[s * B:e * B])
            gw[m] += (gs.t() @ x2[s * B:e * B]).to(gw[m].dtype)
            if ctx.has_bias:
                gb[m] += gs.sum(0).to(gb[m].dtype)
        return (grad_x, None, None, *gw, *gb)


def segment_linear(x, weights, biases, segments):
    """Per-segment Linear on the packed buffer: ``segments`` is ``[(start, end, weight_index), ...]``.

    Under autocast the GEMMs run in the autocast dtype, like ``nn.Linear``.
    """
    _check_tensor("x", x, 3)
    weights, biases = list(weights), list(biases) if biases is not None else []
    device_type = x.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)  # meta: never
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        x, weights, biases = x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
    elif x.dtype != weights[0].dtype:
        raise TypeError(f"x: expected dtype {weights[0].dtype} (the weights'), got {x.dtype}")
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return SegmentLinearFunction.apply(x, tuple(segments), len(weights), *weights, *biases)
