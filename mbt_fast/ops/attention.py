"""Multimodal bottleneck attention: contract, dispatch, and the fake kernels of its compiled ops.

``mbt_attention(q, k, v, segments)``: q ``[Nq, B, H, D]``, k/v ``[Nk, B, H, D]`` (token-major); the
queries in ``[q_start, q_end)`` of each segment attend to exactly the keys in ``[k_start, k_end)``,
softmax scale ``1/sqrt(D)`` unless given; query rows in no segment return 0 (and get zero gradients).
``segments`` is a tuple of ``(q_start, q_end, k_start, k_end)`` int rows (a layout's ``attn_segments``);
query ranges are disjoint. Attention dropout (``dropout_p``) exists on the ``torch`` backend only.
``key_mask`` (bool ``[B, Nk]``, optional): per sample, the keys that may be attended (False: padding,
e.g. past a ragged feature sequence's length), on top of the segments; every query row in a segment
must keep at least one of its keys (the model's CLS token, or a length >= 1, guarantees it).

``mbt_attention_qkv(qkv, segments)`` is the same op on a packed ``qkv [N, B, 3, H, D]`` (the QKV
projection's output viewed per head): equal to ``mbt_attention(*qkv.unbind(2), segments)``, with the
gradient of qkv produced packed where the backend can (``triton``: dq, dk, dv written into one
``[N, B, 3, H, D]`` tensor); elsewhere autograd stacks the three gradients (one copy of the buffer).
"""
from __future__ import annotations

import math

import torch

from mbt_fast import torch_ops
from mbt_fast.ops._contract import attention_segments, check_backend, check_dropout, check_key_mask, check_tensor


def mbt_attention(q, k, v, segments, *, scale: float | None = None, dropout_p: float = 0.0, key_mask=None,
                  backend: str = "torch"):
    check_backend(backend)
    check_tensor("q", q, 4)
    check_tensor("k", k, 4, q)
    check_tensor("v", v, 4, q)
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, k, v: expected [Nq, B, H, D] and two equal [Nk, B, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    seg = attention_segments(segments, q.shape[0], k.shape[0])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout_p = check_dropout(dropout_p)
    key_mask = check_key_mask(key_mask, q.shape[1], k.shape[0], q)
    if backend == "torch" or q.shape[1] == 0:  # an empty batch has nothing to launch
        return torch_ops.mbt_attention(q, k, v, seg, scale, dropout_p, key_mask)
    if dropout_p > 0:
        raise ValueError(f"dropout_p: the {backend} attention kernel has no attention dropout, got {dropout_p}; use backend='torch'")
    if backend == "triton":
        from mbt_fast.kernels.attention import mbt_attention as kernel
        return kernel(q, k, v, seg, scale, key_mask)
    from mbt_fast import cuda_ext
    return cuda_ext.mbt_attention(q, k, v, seg, scale, key_mask, emulated=backend == "cuda-emu")


def mbt_attention_qkv(qkv, segments, *, scale: float | None = None, dropout_p: float = 0.0, key_mask=None,
                      backend: str = "torch"):
    check_backend(backend)
    check_tensor("qkv", qkv, 5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected [N, B, 3, H, D], got shape {tuple(qkv.shape)}")
    if backend != "triton" or dropout_p != 0.0 or qkv.shape[1] == 0:  # the per-tensor op (and its errors)
        return mbt_attention(*qkv.unbind(2), segments, scale=scale, dropout_p=dropout_p, key_mask=key_mask,
                             backend=backend)
    seg = attention_segments(segments, qkv.shape[0], qkv.shape[0])
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    key_mask = check_key_mask(key_mask, qkv.shape[1], qkv.shape[0], qkv)
    from mbt_fast.kernels.attention import mbt_attention_qkv as kernel
    return kernel(qkv, seg, scale, key_mask)


# ---- fake kernels of the C++ ops (torch.ops.mbt_fast[_emu].attention_*), for torch.compile --------

def _fake_attention_fwd(q, k, v, seg, scale, key_mask):
    nq, B, H, _ = q.shape
    return [torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, nq, dtype=torch.float32)]


def _fake_attention_bwd(dout, q, k, v, out, lse, seg, scale, key_mask):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]


CUDA_FAKES = {"attention_fwd": _fake_attention_fwd, "attention_bwd": _fake_attention_bwd}
