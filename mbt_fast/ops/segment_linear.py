"""Per-segment Linear on the packed buffer: one GEMM per row segment, written in place.

``segment_linear(x, weights, biases, segments)``: x ``[N, B, K]``; ``segments`` is a tuple of
``(start, end, weight_index)`` int rows covering ``[0, N)`` exactly once; ``out[s:e] = x[s:e] @ W_m.T
+ b_m``. cuBLAS on every backend (bias in the GEMM: ``addmm``). Under autocast the GEMMs run in the
autocast dtype, like ``nn.Linear``.
"""
from __future__ import annotations

import contextlib

import torch

from mbt_fast.ops._contract import check_tensor, row_segments


class SegmentLinearFunction(torch.autograd.Function):
    """``out[s:e] = x[s:e] @ W_m.T + b_m`` per row segment, each GEMM writing straight into ``out``."""

    @staticmethod
    def forward(ctx, x, segments, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        N, B, _ = x.shape
        out = x.new_empty(N, B, weights[0].shape[0])
        x2, o2 = x.reshape(N * B, x.shape[-1]), out.view(N * B, out.shape[-1])  # explicit widths: B may be 0
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
        g2, x2 = grad_out.reshape(N * B, grad_out.shape[-1]), x.reshape(N * B, x.shape[-1])
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        gw = [torch.zeros_like(w) for w in weights]
        gb = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for w in weights] if ctx.has_bias else []
        for s, e, m in ctx.segments:
            gs = g2[s * B:e * B]
            if grad_x is not None:
                torch.mm(gs, weights[m], out=grad_x.view(N * B, x.shape[-1])[s * B:e * B])
            gw[m] += (gs.t() @ x2[s * B:e * B]).to(gw[m].dtype)
            if ctx.has_bias:
                gb[m] += gs.sum(0).to(gb[m].dtype)
        return (grad_x, None, None, *gw, *gb)


def _distinct(weights, biases, seg):
    """One entry per distinct (weight, bias) pair, segments remapped: a shared encoder passes the same
    parameters for every modality, and an autograd.Function may not take one tensor twice (torch.compile)."""
    keep, remap = [], []
    for i, w in enumerate(weights):
        j = next((j for j in keep if weights[j] is w and (not biases or biases[j] is biases[i])), None)
        if j is None:
            keep.append(i)
        remap.append(keep.index(j if j is not None else i))
    if len(keep) == len(weights):
        return weights, biases, seg
    return ([weights[i] for i in keep], [biases[i] for i in keep] if biases else [],
            tuple((s, e, remap[m]) for s, e, m in seg))


def autocast_dtype(device_type: str):
    """The autocast dtype the GEMMs run in on ``device_type``, or None outside autocast (meta: never;
    ``mbt_fast.perf_model`` replaces this to emulate autocast there)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def segment_linear(x, weights, biases, segments):
    check_tensor("x", x, 3)
    weights, biases = list(weights), list(biases) if biases is not None else []
    if not weights:
        raise ValueError("weights: expected at least one [out, in] weight, got none")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, 2, x)
        if w.shape != weights[0].shape or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weights[{i}]: expected shape [out, {x.shape[-1]}] like weights[0] "
                             f"{tuple(weights[0].shape)}, got {tuple(w.shape)}")
    if biases and len(biases) != len(weights):
        raise ValueError(f"biases: expected {len(weights)} (one per weight) or None, got {len(biases)}")
    for i, b in enumerate(biases):
        check_tensor(f"biases[{i}]", b, 1, x)
        if b.shape != (weights[0].shape[0],):
            raise ValueError(f"biases[{i}]: expected shape ({weights[0].shape[0]},), got {tuple(b.shape)}")
    seg = row_segments(segments, x.shape[0], len(weights))
    weights, biases, seg = _distinct(weights, biases, seg)
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    autocast = dtype is not None
    if autocast:
        x, weights, biases = x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
    elif any(t.dtype != x.dtype for t in weights + biases):
        raise TypeError(f"x: expected the dtype of the weights and biases, got x {x.dtype}, "
                        f"weights {[w.dtype for w in weights]}, biases {[b.dtype for b in biases]}")
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return SegmentLinearFunction.apply(x, seg, len(weights), *weights, *biases)
