"""Segment LayerNorm: LayerNorm over C with per-modality weights picked by row.

``segment_layernorm(x, weight, bias, row_weight, eps)``: x ``[N, B, C]``; row ``n`` is normalised with
fp32 statistics and scaled by ``weight[row_weight[n]]``, shifted by ``bias[row_weight[n]]`` (``[M, C]``
tables, ``row_weight`` int32 ``[N]`` with values in ``[0, M)``); ``eps > 0``. Output in x's dtype.
``segments`` (optional): the same map as ``(start, end, m)`` rows covering ``[0, N)``, as
``PackedLayout.row_segments()`` gives it; with it the ``torch`` backend runs one affine LayerNorm per
segment instead of gathering a weight and a bias row per token (the kernels read ``row_weight``).
"""
from __future__ import annotations

import torch

from mbt_fast import torch_ops
from mbt_fast.ops._contract import check_backend, check_eps, check_row_weight, check_row_weight_segments, check_tensor


def check_segment_layernorm(x, weight, bias, row_weight, eps, segments) -> tuple:
    """The argument checks of ``segment_layernorm`` (and of ``residual_mean_layernorm``); returns the
    validated ``(eps, segments)``."""
    check_tensor("x", x, 3)
    check_tensor("weight", weight, 2, x)
    check_tensor("bias", bias, 2, x)
    if bias.shape != weight.shape:
        raise ValueError(f"bias: expected the shape of weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    check_row_weight(row_weight, x, weight)
    eps = check_eps(eps)
    if segments is not None:
        segments = check_row_weight_segments(segments, row_weight, weight)
    return eps, segments


def segment_layernorm(x, weight, bias, row_weight, eps: float = 1e-6, *, segments=None, backend: str = "torch"):
    check_backend(backend)
    eps, segments = check_segment_layernorm(x, weight, bias, row_weight, eps, segments)
    if backend == "torch" or x.shape[1] == 0:  # an empty batch has nothing to launch
        return torch_ops.segment_layernorm(x, weight, bias, row_weight, eps, segments)
    if backend == "triton":
        from mbt_fast.kernels.segment_layernorm import segment_layernorm as kernel
        return kernel(x, weight, bias, row_weight.to(x.device), eps)
    from mbt_fast import cuda_ext
    return cuda_ext.segment_layernorm(x, weight, bias, row_weight, eps, emulated=backend == "cuda-emu")


# ---- fake kernels of the C++ ops (torch.ops.mbt_fast[_emu].segment_layernorm_*), for torch.compile -

def _fake_segment_layernorm_fwd(x, weight, bias, row_weight, eps):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return [torch.empty_like(x), stats, torch.empty_like(stats)]


def _fake_segment_layernorm_bwd(grad, x, weight, row_weight, mean, rstd):
    table = weight.new_empty(weight.shape, dtype=torch.float32)
    return [torch.empty_like(x), table, torch.empty_like(table)]


CUDA_FAKES = {"segment_layernorm_fwd": _fake_segment_layernorm_fwd, "segment_layernorm_bwd": _fake_segment_layernorm_bwd}
