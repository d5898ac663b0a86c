"""The fused ops of mbt_fast and their dispatch by backend.

Modules call these functions and never a kernel. Each op has one module here holding its contract
(docstring and argument checks), its dispatch, and the fake kernels of its compiled implementations;
the implementations are ``mbt_fast.torch_ops`` (backend ``torch``, plain PyTorch that ``torch.compile``
traces and Inductor fuses), ``mbt_fast.kernels.<op>`` (Triton, backend ``triton``) and
``mbt_fast.cuda_ext`` over ``csrc/<op>/`` (CUDA ops ``torch.ops.mbt_fast.*``, backend ``cuda``; the same
sources emulated on the CPU as ``torch.ops.mbt_fast_emu.*``, backend ``cuda-emu``). All tensors are
token-major (``[N, B, ...]``, see ``mbt_fast.layout``).

Segment tables are tuples of Python ints, validated once per table and cached; nothing in the hot
path reads tensor data on the host, so ``torch.compile(model, fullgraph=True)`` traces every backend
but ``triton`` without a graph break.
"""
from mbt_fast.ops.attention import mbt_attention, mbt_attention_qkv
from mbt_fast.ops.bias_gelu import bias_gelu, linear_bias_gelu
from mbt_fast.ops.residual_mean import BOTTLENECK_MODES, residual_mean
from mbt_fast.ops.residual_mean_layernorm import residual_mean_layernorm
from mbt_fast.ops.segment_layernorm import segment_layernorm
from mbt_fast.ops.segment_linear import segment_linear

__all__ = ["mbt_attention", "mbt_attention_qkv", "residual_mean", "residual_mean_layernorm", "segment_layernorm", "bias_gelu", "linear_bias_gelu", "segment_linear", "BOTTLENECK_MODES"]
