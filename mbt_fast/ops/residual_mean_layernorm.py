"""Residual + bottleneck mean followed by the next segment LayerNorm, as one op.

``residual_mean_layernorm(x, y, keep, layout, bottleneck, weight, bias, row_weight, eps)`` returns
``(x_new, h)``: ``x_new`` exactly what ``residual_mean(x, y, keep, layout, bottleneck)`` returns and ``h``
exactly what ``segment_layernorm(x_new, weight, bias, row_weight, eps)`` returns (see those ops for each
argument; ``segments`` as in ``segment_layernorm``). The block needs both: ``x_new`` is the residual
stream, ``h`` the next branch's input. Gradients flow into x, y, weight and bias from both outputs.

Backends: ``torch`` composes the two torch implementations (Inductor fuses them under
``torch.compile``); ``triton`` runs one kernel forward and one backward (``kernels/residual_mean_layernorm.py``:
the LayerNorm reads the row the residual add holds in registers instead of re-reading x_new);
``cuda``/``cuda-emu`` compose the two CUDA ops (there is no fused CUDA kernel).
"""
from __future__ import annotations

from mbt_fast import torch_ops
from mbt_fast.layout import PackedLayout
from mbt_fast.ops._contract import check_backend, check_eps, check_row_weight, check_row_weight_segments, check_tensor
from mbt_fast.ops.residual_mean import BOTTLENECK_MODES


def _check_residual(x, y, keep, layout, bottleneck: str) -> None:
    """``residual_mean``'s argument checks (same names and messages)."""
    check_tensor("x", x, 3)
    check_tensor("y", y, 3, x)
    if not isinstance(layout, PackedLayout):
        raise TypeError(f"layout: expected a mbt_fast.layout.PackedLayout, got {type(layout).__name__}")
    if y.shape != x.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[0] != layout.total_rows:
        raise ValueError(f"x: expected {layout.total_rows} rows for {layout}, got {x.shape[0]}")
    if bottleneck not in BOTTLENECK_MODES:
        raise ValueError(f"bottleneck: expected one of {BOTTLENECK_MODES}, got {bottleneck!r}")
    if keep is not None:
        check_tensor("keep", keep, 2, x)
        if tuple(keep.shape) != (x.shape[1], layout.num_modalities):
            raise ValueError(f"keep: expected shape {(x.shape[1], layout.num_modalities)}, got {tuple(keep.shape)}")


def _check_layernorm(x, weight, bias, row_weight, eps, segments):
    """``segment_layernorm``'s argument checks (same names and messages); the validated (eps, segments)."""
    check_tensor("weight", weight, 2, x)
    check_tensor("bias", bias, 2, x)
    if bias.shape != weight.shape:
        raise ValueError(f"bias: expected the shape of weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    check_row_weight(row_weight, x, weight)
    eps = check_eps(eps)
    if segments is not None:
        segments = check_row_weight_segments(segments, row_weight, weight)
    return eps, segments


def residual_mean_layernorm(x, y, keep, layout: PackedLayout, bottleneck: str, weight, bias, row_weight,
                            eps: float = 1e-6, *, segments=None, backend: str = "torch"):
    check_backend(backend)
    _check_residual(x, y, keep, layout, bottleneck)
    eps, segments = _check_layernorm(x, weight, bias, row_weight, eps, segments)
    if backend == "torch" or x.shape[1] == 0:  # an empty batch has nothing to launch
        return torch_ops.residual_mean_layernorm(x, y, keep, layout, bottleneck, weight, bias, row_weight, eps, segments)
    if backend == "triton":
        from mbt_fast.kernels.residual_mean_layernorm import residual_mean_layernorm as kernel
        return kernel(x, y, keep, layout, bottleneck, weight, bias, row_weight.to(x.device), eps)
    from mbt_fast import cuda_ext  # the two CUDA kernels in sequence: no fused CUDA kernel yet
    emulated = backend == "cuda-emu"
    x_new = cuda_ext.residual_mean(x, y, keep, layout, bottleneck, emulated=emulated)
    return x_new, cuda_ext.segment_layernorm(x_new, weight, bias, row_weight, eps, emulated=emulated)
