"""Bias + tanh-GELU, the fused epilogue of fc1.

``bias_gelu(x, bias, row_weight)``: tanh-GELU of ``x + bias[row_weight[n]]`` on x ``[N, B, F]``, the
bias a ``[M, F]`` table, ``row_weight`` int32 ``[N]`` with values in ``[0, M)``. Output in x's dtype.
"""
from __future__ import annotations

import torch

from mbt_fast import torch_ops
from mbt_fast.ops._contract import check_backend, check_row_weight, check_tensor


def bias_gelu(x, bias, row_weight, *, backend: str = "torch"):
    check_backend(backend)
    check_tensor("x", x, 3)
    check_tensor("bias", bias, 2, x)
    check_row_weight(row_weight, x, bias)
    if backend == "torch" or x.shape[1] == 0:  # an empty batch has nothing to launch
        return torch_ops.bias_gelu(x, bias, row_weight)
    if backend == "triton":
        from mbt_fast.kernels.bias_gelu import bias_gelu as kernel
        return kernel(x, bias, row_weight.to(x.device))
    from mbt_fast import cuda_ext
    return cuda_ext.bias_gelu(x, bias, row_weight, emulated=backend == "cuda-emu")


# ---- fake kernels of the C++ ops (torch.ops.mbt_fast[_emu].bias_gelu_*), for torch.compile ---------

def _fake_bias_gelu_fwd(x, bias, row_weight):
    return torch.empty_like(x)


def _fake_bias_gelu_bwd(grad, x, bias, row_weight):
    return [torch.empty_like(x), bias.new_empty(bias.shape, dtype=torch.float32)]


CUDA_FAKES = {"bias_gelu_fwd": _fake_bias_gelu_fwd, "bias_gelu_bwd": _fake_bias_gelu_bwd}
