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
from mbt_fast.ops._contract import check_backend
from mbt_fast.ops.residual_mean import check_residual_mean
from mbt_fast.ops.segment_layernorm import check_segment_layernorm


def residual_mean_layernorm(x, y, keep, layout: PackedLayout, bottleneck: str, weight, bias, row_weight,
                            eps: float = 1e-6, *, segments=None, backend: str = "torch"):
    check_backend(backend)
    check_residual_mean(x, y, keep, layout, bottleneck)
    eps, segments = check_segment_layernorm(x, weight, bias, row_weight, eps, segments)
    if backend == "torch" or x.shape[1] == 0:  # an empty batch has nothing to launch
        return torch_ops.residual_mean_layernorm(x, y, keep, layout, bottleneck, weight, bias, row_weight, eps, segments)
    if backend == "triton":
        from mbt_fast.kernels.residual_mean_layernorm import residual_mean_layernorm as kernel
        return kernel(x, y, keep, layout, bottleneck, weight, bias, row_weight.to(x.device), eps)
    from mbt_fast import cuda_ext  # the two CUDA kernels in sequence: no fused CUDA kernel yet
    emulated = backend == "cuda-emu"
    x_new = cuda_ext.residual_mean(x, y, keep, layout, bottleneck, emulated=emulated)
    return x_new, cuda_ext.segment_layernorm(x_new, weight, bias, row_weight, eps, emulated=emulated)
