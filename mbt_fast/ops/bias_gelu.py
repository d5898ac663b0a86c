"""Bias + tanh-GELU, the fused epilogue of fc1.

``bias_gelu(x, bias, row_weight)``: tanh-GELU of ``x + bias[row_weight[n]]`` on x ``[N, B, F]``, the
bias a ``[M, F]`` table, ``row_weight`` int32 ``[N]`` with values in ``[0, M)``. Output in x's dtype.

``linear_bias_gelu(x, weights, biases, segments, row_weight)`` is fc1 with this epilogue:
``gelu_tanh(x[s:e] @ W_m.T + b_m)`` per row segment. Where the bias goes is the backend's choice: the
``torch`` backend adds it inside each segment's GEMM (``addmm``, as ``nn.Linear``) and runs one GELU
over the output, with no per-row bias gather; the kernel backends run the GEMMs without bias (one
grouped GEMM where the GPU has one, see ``segment_linear``) and then the fused ``bias_gelu`` kernel
(one pass over the activations instead of two). On CUDA without autograd (inference) every backend
runs bias and GELU in the GEMM's epilogue instead (``segment_linear.gelu_epilogue``: no GELU pass).
"""
from __future__ import annotations

import torch

import torch.nn.functional as F

from mbt_fast import torch_ops
from mbt_fast.ops._contract import check_backend, check_row_weight, check_tensor
from mbt_fast.ops.segment_linear import gelu_epilogue, segment_linear, segment_linear_gelu


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


def linear_bias_gelu(x, weights, biases, segments, row_weight, *, backend: str = "torch"):
    check_backend(backend)
    biases = list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"biases: expected {len(weights)} (one per weight), got {len(biases)}")
    needs_grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in [x, *weights, *biases])
    if gelu_epilogue(x.device.type, needs_grad):
        return segment_linear_gelu(x, weights, biases, segments)
    if backend == "torch":
        h = segment_linear(x, weights, biases, segments)
        # in place when nothing needs the pre-activation (inference): no second [N, B, F] buffer
        if torch.is_grad_enabled() and h.requires_grad:
            return F.gelu(h, approximate="tanh")
        return torch.ops.aten.gelu_(h, approximate="tanh")
    h = segment_linear(x, weights, None, segments)
    return bias_gelu(h, torch.stack(biases).to(h.dtype), row_weight, backend=backend)


# ---- fake kernels of the C++ ops (torch.ops.mbt_fast[_emu].bias_gelu_*), for torch.compile ---------

def _fake_bias_gelu_fwd(x, bias, row_weight):
    return torch.empty_like(x)


def _fake_bias_gelu_bwd(grad, x, bias, row_weight):
    return [torch.empty_like(x), bias.new_empty(bias.shape, dtype=torch.float32)]


CUDA_FAKES = {"bias_gelu_fwd": _fake_bias_gelu_fwd, "bias_gelu_bwd": _fake_bias_gelu_bwd}
