"""Multimodal bottleneck attention in Triton: one launch for every modality, head and sample.

Contract (``mbt_fast.ops.mbt_attention``): q ``[Nq, B, H, D]``, k/v ``[Nk, B, H, D]``, token-major,
any strides along N, B and H; ``segments`` int32 ``[S, 4]`` rows ``(q_start, q_end, k_start, k_end)``:
the queries in ``[q_start, q_end)`` attend exactly to the keys in ``[k_start, k_end)``. Query ranges
are disjoint; query rows in no segment output 0 and get a zero gradient.

How it is computed:

* forward: flash-style online softmax, fp32 accumulation, ``exp2`` with ``log2(e)`` folded into the
  softmax scale and the scale into the exponent's argument (``exp2(s * x - max)``, one FFMA per score);
  the natural-log LSE of every row is saved as fp32 ``[B, H, Nq]``;
* every loop over blocks runs a segment's full blocks without masks or selects and its partial last
  block apart, masked (``PEEL_TAIL``; fp16/bf16, see ``_peel_tail``);
* backward: ``delta = rowsum(dO * O)`` (preprocess kernel), then dK/dV per key block (looping over the
  query blocks of every segment that sees the block) and dQ per query block (looping over the
  segment's key blocks), both recomputing P from the LSE: deterministic, no atomics, no N x N matrix;
* the grid is ``(blocks, B * H)``: a small host-built int32 *block table* gives each program its rows
  and the segment they belong to, so ragged segments never share a block and nothing is padded.

Precision: fp16/bf16 operands go to the tensor cores with fp32 accumulation (P and dS are rounded to
the input dtype before their GEMM, as in FlashAttention). fp32 inputs use ``input_precision="ieee"``:
true fp32 dot products on the GPU, **no TF32**. Under the Triton interpreter (``TRITON_INTERPRET=1``)
every dot operand is upcast to fp32 after that rounding, because the interpreter's ``tl.dot`` is
silently wrong on bf16 (Triton 3.8); the result equals the GPU math up to summation order.

Strides: the last (D) dimension must have stride 1 so loads vectorise; an input whose D stride is not
1 is copied once by the launcher (views of a packed ``[N, B, 3, H, D]`` qkv buffer need no copy).
"""
from __future__ import annotations

import contextlib
import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from mbt_fast.backends import triton_interpreting
from mbt_fast.ops._contract import check_key_mask

HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------------
def mbt_attention_ref(q, k, v, segments, scale: float | None = None, dtype: torch.dtype = torch.float32,
                      key_mask=None):
    """Naive masked attention over the full ``[Nq, Nk]`` score matrix, computed in ``dtype``.

    ``dtype=float32`` is the oracle of the tests; a low ``dtype`` gives the "eager low precision"
    error that sets their tolerance. ``key_mask``: bool ``[B, Nk]`` or None. Returns ``[Nq, B, H, D]``
    in ``dtype``; differentiable.
    """
    nq, nk = q.shape[0], k.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    allowed = torch.zeros(nq, nk, dtype=torch.bool, device=q.device)
    for qs, qe, ks, ke in torch.as_tensor(segments).reshape(-1, 4).tolist():
        allowed[qs:qe, ks:ke] = True
    covered = allowed.any(1, keepdim=True)
    # rows in no segment: unmask them (a softmax over nothing is NaN) and zero their output below
    allowed = allowed | ~covered
    qf, kf, vf = (t.to(dtype).permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, N, D]
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if key_mask is not None:  # [B, 1, Nq, Nk]: padding keys masked in every covered row
        allowed = allowed & (key_mask[:, None, None, :] | ~covered)
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (p @ vf).permute(2, 0, 1, 3)
    return torch.where(covered[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; fp32 operands use exact (IEEE) products, not TF32."""
    if DOT_FP32:  # interpreter only: its bf16 tl.dot is wrong, so run the (already rounded) operands in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _key_valid(KM, offs_n, k_end, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """The keys of a block that may be attended: inside the segment (``MASKED`` tail) and, with a key
    mask, not padding (``KM``: this sample's uint8 mask row)."""
    if HAS_KEY_MASK:
        if MASKED:
            return (offs_n < k_end) & (tl.load(KM + offs_n, mask=offs_n < k_end, other=0) != 0)
        return tl.load(KM + offs_n) != 0
    return offs_n < k_end


@triton.jit
def _key_rows(P, Desc, bh_coords, n_start, k_end, stride_n, offs_d, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              TMA: tl.constexpr):
    """The ``[BLOCK_N, D]`` rows of K or V from ``n_start``. Only a segment's last, partial block is
    ``MASKED`` (its rows past the segment load as 0). A full block comes with ``TMA`` as one tensor-
    memory-accelerator copy from ``Desc``, a ``(B, N, H, D)`` descriptor, at ``bh_coords = (b, h)``
    (sm_90 candidates: no per-thread addresses, no LDGSTS); else by per-thread loads from ``P``."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    ptrs = P + offs_n.to(tl.int64)[:, None] * stride_n + offs_d[None, :]  # int64: N * stride_n can pass 2**31
    if MASKED:
        return tl.load(ptrs, mask=(offs_n < k_end)[:, None], other=0.0)
    if TMA:
        return tl.reshape(Desc.load([bh_coords[0], n_start, bh_coords[1], 0]), [BLOCK_N, offs_d.shape[0]])
    return tl.load(ptrs)


@triton.jit
def _fwd_qk(q, K, KDesc, bh_coords, n_start, k_end, stride_kn, offs_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MASKED: tl.constexpr, TMA: tl.constexpr, DOT_FP32: tl.constexpr):
    """The raw scores ``q K^T`` of one key block (fp32)."""
    k = _key_rows(K, KDesc, bh_coords, n_start, k_end, stride_kn, offs_d, BLOCK_N, MASKED, TMA)
    return _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_FP32)


@triton.jit
def _fwd_softmax(qk, l_i, m_i, KM, n_start, k_end, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 SCALE_POSITIVE: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """The online-softmax step of one block's scores: ``p`` (fp32), the factor ``alpha`` that rescales
    what was accumulated before, and the new row sums and maxima. Full blocks never select and fold
    the scale into the exponent (one FFMA per score: ``exp2(qk * scale - max)``, the row max taken on
    the unscaled scores); the masked tail and a key mask select."""
    if MASKED or HAS_KEY_MASK:
        valid = _key_valid(KM, n_start + tl.arange(0, BLOCK_N), k_end, MASKED, HAS_KEY_MASK)
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_KEY_MASK:  # a block of padding keeps a row's max at -inf: exponentiate against 0 instead
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # the first key block of a segment always holds a valid key, so m_new is finite from the start
            m_base = m_new
        p = tl.math.exp2(qk - m_base[:, None])
    else:
        # max(s * x) = s * max(x) for s >= 0 and s * min(x) for s < 0 (a negative user scale)
        row = tl.max(qk, 1) if SCALE_POSITIVE else tl.min(qk, 1)
        m_new = tl.maximum(m_i, row * qk_scale)
        m_base = m_new
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_base)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd_pv(acc, p, alpha, V, VDesc, bh_coords, n_start, k_end, stride_vn, offs_d, BLOCK_N: tl.constexpr,
            MASKED: tl.constexpr, TMA: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc * alpha + p V`` for one key block (``p`` rounded to V's dtype first, as FlashAttention)."""
    v = _key_rows(V, VDesc, bh_coords, n_start, k_end, stride_vn, offs_d, BLOCK_N, MASKED, TMA)
    return _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32)


@triton.jit
def _fwd_scores(q, K, KDesc, bh_coords, KM, n_start, k_end, stride_kn, offs_d, l_i, m_i, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
                HAS_KEY_MASK: tl.constexpr, TMA: tl.constexpr, DOT_FP32: tl.constexpr):
    """One key block's scores and softmax step (``_fwd_softmax``'s results)."""
    qk = _fwd_qk(q, K, KDesc, bh_coords, n_start, k_end, stride_kn, offs_d, BLOCK_M, BLOCK_N, MASKED, TMA, DOT_FP32)
    return _fwd_softmax(qk, l_i, m_i, KM, n_start, k_end, qk_scale, BLOCK_N, MASKED, SCALE_POSITIVE, HAS_KEY_MASK)


@triton.jit
def _fwd_overlapped_block(acc, p, alpha, l_i, m_i, q, K, V, KDesc, VDesc, bh_coords, KM, n_start, k_end, stride_kn,
                          stride_vn, offs_d, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          MASKED: tl.constexpr, SCALE_POSITIVE: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                          TMA: tl.constexpr, DOT_FP32: tl.constexpr):
    """``OVERLAP_PV`` order: block ``n_start``'s scores, then the previous (full) block's ``P V`` with its
    ``p``/``alpha``, then ``n_start``'s softmax; returns ``p`` in V's dtype for the next step."""
    qk = _fwd_qk(q, K, KDesc, bh_coords, n_start, k_end, stride_kn, offs_d, BLOCK_M, BLOCK_N, MASKED, TMA, DOT_FP32)
    acc = _fwd_pv(acc, p, alpha, V, VDesc, bh_coords, n_start - BLOCK_N, k_end, stride_vn, offs_d, BLOCK_N, False,
                  TMA, DOT_FP32)
    p, alpha, l_i, m_i = _fwd_softmax(qk, l_i, m_i, KM, n_start, k_end, qk_scale, BLOCK_N, MASKED, SCALE_POSITIVE,
                                      HAS_KEY_MASK)
    return acc, p.to(V.dtype.element_ty), alpha, l_i, m_i


@triton.jit
def _fwd_key_block(acc, l_i, m_i, q, K, V, KDesc, VDesc, bh_coords, KM, n_start, k_end, stride_kn, stride_vn, offs_d,
                   qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   SCALE_POSITIVE: tl.constexpr, HAS_KEY_MASK: tl.constexpr, TMA: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    """One key block in order: scores, softmax, ``P V``."""
    p, alpha, l_i, m_i = _fwd_scores(q, K, KDesc, bh_coords, KM, n_start, k_end, stride_kn, offs_d, l_i, m_i, qk_scale,
                                     BLOCK_M, BLOCK_N, MASKED, SCALE_POSITIVE, HAS_KEY_MASK, TMA, DOT_FP32)
    acc = _fwd_pv(acc, p, alpha, V, VDesc, bh_coords, n_start, k_end, stride_vn, offs_d, BLOCK_N, MASKED, TMA,
                  DOT_FP32)
    return acc, l_i, m_i


@triton.jit
def _mbt_attention_fwd_kernel(
    Q, K, V, Out, Lse, QBlocks, KeyMask, KDesc, VDesc,
    stride_qn, stride_qb, stride_qh,
    stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh,
    stride_on, stride_ob, stride_oh,
    num_heads, nq, mask_stride, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
    PEEL_TAIL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, TMA: tl.constexpr, OVERLAP_PV: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One program = one query block of one segment, for one (sample, head). With ``TMA`` the full key
    blocks come through the descriptors ``KDesc``/``VDesc`` (``_key_rows``); else they are unread.
    With ``OVERLAP_PV`` (needs ``PEEL_TAIL``) block j's ``P V`` is issued after block j+1's ``Q K^T`` and
    before its softmax: on sm_90 the ``P V`` wgmma then runs during that softmax (the pipeliner waits on
    the ``Q K^T`` wgmma at once, and on ``P V`` only at the next ``Q K^T``)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # int64: b * stride_b passes 2**31 for a batch-major caller at large B
    h = (bh % num_heads).to(tl.int64)
    bh_coords = (bh // num_heads, bh % num_heads)  # int32 TMA coordinates
    # block table row: (q_start, q_end, k_start, k_end, first row of this block)
    q_end = tl.load(QBlocks + blk * 5 + 1)
    k_start = tl.load(QBlocks + blk * 5 + 2)
    k_end = tl.load(QBlocks + blk * 5 + 3)
    m_start = tl.load(QBlocks + blk * 5 + 4)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    rows_m = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m * stride_qn + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    KeyMask += b * mask_stride

    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp(x * s) = exp2(x * s * log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_tail = k_start
    if PEEL_TAIL:  # the full key blocks unmasked, then the partial one
        k_tail += (k_end - k_start) // BLOCK_N * BLOCK_N
    tl.static_assert(PEEL_TAIL or not OVERLAP_PV, "OVERLAP_PV needs PEEL_TAIL (fp16/bf16 tiles)")
    if OVERLAP_PV:
        # block 0 (the tail when the segment has no full block): scores and softmax, its P V deferred
        if k_tail > k_start:
            p, alpha, l_i, m_i = _fwd_scores(q, K, KDesc, bh_coords, KeyMask, k_start, k_end, stride_kn, offs_d, l_i,
                                             m_i, qk_scale, BLOCK_M, BLOCK_N, False, SCALE_POSITIVE, HAS_KEY_MASK,
                                             TMA, DOT_FP32)
        else:
            p, alpha, l_i, m_i = _fwd_scores(q, K, KDesc, bh_coords, KeyMask, k_start, k_end, stride_kn, offs_d, l_i,
                                             m_i, qk_scale, BLOCK_M, BLOCK_N, True, SCALE_POSITIVE, HAS_KEY_MASK,
                                             TMA, DOT_FP32)
        p = p.to(V.dtype.element_ty)
        for n_start in range(k_start + BLOCK_N, k_tail, BLOCK_N):  # full blocks: Q K^T, previous P V, softmax
            acc, p, alpha, l_i, m_i = _fwd_overlapped_block(acc, p, alpha, l_i, m_i, q, K, V, KDesc, VDesc, bh_coords,
                                                            KeyMask, n_start, k_end, stride_kn, stride_vn, offs_d,
                                                            qk_scale, BLOCK_M, BLOCK_N, False, SCALE_POSITIVE,
                                                            HAS_KEY_MASK, TMA, DOT_FP32)
        if (k_tail > k_start) & (k_tail < k_end):  # the tail after full blocks
            acc, p, alpha, l_i, m_i = _fwd_overlapped_block(acc, p, alpha, l_i, m_i, q, K, V, KDesc, VDesc, bh_coords,
                                                            KeyMask, k_tail, k_end, stride_kn, stride_vn, offs_d,
                                                            qk_scale, BLOCK_M, BLOCK_N, True, SCALE_POSITIVE,
                                                            HAS_KEY_MASK, TMA, DOT_FP32)
        last = k_tail - BLOCK_N * (k_tail >= k_end).to(tl.int32)  # the tail, else the last full block
        acc = _fwd_pv(acc, p, alpha, V, VDesc, bh_coords, last, k_end, stride_vn, offs_d, BLOCK_N, True, TMA,
                      DOT_FP32)
    else:
        if PEEL_TAIL:
            for n_start in range(k_start, k_tail, BLOCK_N):
                acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, K, V, KDesc, VDesc, bh_coords, KeyMask, n_start,
                                               k_end, stride_kn, stride_vn, offs_d, qk_scale, BLOCK_M, BLOCK_N, False,
                                               SCALE_POSITIVE, HAS_KEY_MASK, TMA, DOT_FP32)
        for n_start in range(k_tail, k_end, BLOCK_N):  # masked: the tail, or every block without PEEL_TAIL
            acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, K, V, KDesc, VDesc, bh_coords, KeyMask, n_start, k_end,
                                           stride_kn, stride_vn, offs_d, qk_scale, BLOCK_M, BLOCK_N, True,
                                           SCALE_POSITIVE, HAS_KEY_MASK, TMA, DOT_FP32)

    acc = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + rows_m * stride_on + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=m_mask[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(Lse + bh.to(tl.int64) * nq + offs_m, lse, mask=m_mask)


@triton.jit
def _mbt_attention_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_on, stride_ob, stride_oh,
    stride_don, stride_dob, stride_doh,
    num_heads, nq,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``delta[b, h, n] = sum_d dO * O`` over every row (rows in no segment have O = 0, so delta = 0)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # int64: b * stride_b passes 2**31 for a batch-major caller at large B
    h = (bh % num_heads).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < nq
    rows_m = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows_m * stride_on + offs_d[None, :],
                mask=m_mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m * stride_don + offs_d[None, :],
                 mask=m_mask[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * nq + offs_m, tl.sum(o * do, 1), mask=m_mask)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, Q, DO, Lse, Delta, m_start, q_end, stride_qn, stride_don, offs_d, qk_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One query block's share of dK and dV (transposed frame); only a segment's last, partial query
    block is ``MASKED``."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    rows_m = offs_m.to(tl.int64)[:, None]
    if MASKED:
        m_mask = offs_m < q_end
        q = tl.load(Q + rows_m * stride_qn + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        do = tl.load(DO + rows_m * stride_don + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        lse2 = tl.load(Lse + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + offs_m, mask=m_mask, other=0.0)
    else:
        q = tl.load(Q + rows_m * stride_qn + offs_d[None, :])
        do = tl.load(DO + rows_m * stride_don + offs_d[None, :])
        lse2 = tl.load(Lse + offs_m) * 1.4426950408889634
        delta = tl.load(Delta + offs_m)
    # P^T recomputed from the saved LSE: [BLOCK_N, BLOCK_M]
    qk_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), DOT_FP32)
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(m_mask[None, :], p_t, 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, DOT_FP32)
    dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), DOT_FP32)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, DOT_FP32)
    return dk, dv


@triton.jit
def _mbt_attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta, KBlocks, SegQ, KeyMask,
    stride_qn, stride_qb, stride_qh,
    stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh,
    stride_don, stride_dob, stride_doh,
    stride_gn, stride_gb, stride_gh,
    num_heads, nq, mask_stride, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PEEL_TAIL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One program = one key block, for one (sample, head): dK and dV of its rows.

    Works in the transposed frame (``[keys, queries]``) so K, V, dK, dV stay in registers while the
    query blocks of every segment that sees this key block stream past.
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # int64: b * stride_b passes 2**31 for a batch-major caller at large B
    h = (bh % num_heads).to(tl.int64)
    # key block table row: (first row, end of its key interval, first and past-last entry in SegQ)
    n_start = tl.load(KBlocks + blk * 4 + 0)
    n_end = tl.load(KBlocks + blk * 4 + 1)
    s_first = tl.load(KBlocks + blk * 4 + 2)
    s_last = tl.load(KBlocks + blk * 4 + 3)

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < n_end
    rows_n = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b * stride_kb + h * stride_kh + rows_n * stride_kn + offs_d[None, :],
                mask=n_mask[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows_n * stride_vn + offs_d[None, :],
                mask=n_mask[:, None], other=0.0)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    Lse += bh.to(tl.int64) * nq
    Delta += bh.to(tl.int64) * nq

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for s in range(s_first, s_last):  # usually one segment; several when key ranges overlap
        q_start = tl.load(SegQ + s * 2 + 0)
        q_end = tl.load(SegQ + s * 2 + 1)
        q_tail = q_start
        if PEEL_TAIL:  # the full query blocks unmasked, then the partial one
            q_tail += (q_end - q_start) // BLOCK_M * BLOCK_M
            for m_start in range(q_start, q_tail, BLOCK_M):
                dk, dv = _dkdv_query_block(dk, dv, k, v, Q, DO, Lse, Delta, m_start, q_end, stride_qn, stride_don,
                                           offs_d, qk_scale, BLOCK_M, BLOCK_N, False, DOT_FP32)
        for m_start in range(q_tail, q_end, BLOCK_M):  # masked: the tail, or every block without PEEL_TAIL
            dk, dv = _dkdv_query_block(dk, dv, k, v, Q, DO, Lse, Delta, m_start, q_end, stride_qn, stride_don,
                                       offs_d, qk_scale, BLOCK_M, BLOCK_N, True, DOT_FP32)

    dk = dk * sm_scale  # dS is the gradient of the scaled scores
    if HAS_KEY_MASK:  # a padding key's P column is 0, and its dK, dV rows depend on that column alone
        valid = _key_valid(KeyMask + b * mask_stride, offs_n, n_end, True, True)
        dk = tl.where(valid[:, None], dk, 0.0)
        dv = tl.where(valid[:, None], dv, 0.0)
    rows_g = rows_n * stride_gn + b * stride_gb + h * stride_gh + offs_d[None, :]
    tl.store(DK + rows_g, dk.to(DK.dtype.element_ty), mask=n_mask[:, None])
    tl.store(DV + rows_g, dv.to(DV.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _dq_key_block(dq, q, do, lse2, delta, K, V, KM, n_start, k_end, stride_kn, stride_vn, offs_d, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    """One key block's share of dQ; only a segment's last, partial key block is ``MASKED``."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    rows_n = offs_n.to(tl.int64)[:, None]
    if MASKED:
        n_mask = offs_n < k_end
        k = tl.load(K + rows_n * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(V + rows_n * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(K + rows_n * stride_kn + offs_d[None, :])
        v = tl.load(V + rows_n * stride_vn + offs_d[None, :])
    qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_FP32)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED or HAS_KEY_MASK:
        p = tl.where(_key_valid(KM, offs_n, k_end, MASKED, HAS_KEY_MASK)[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_FP32)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, DOT_FP32)


@triton.jit
def _mbt_attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta, QBlocks, KeyMask,
    stride_qn, stride_qb, stride_qh,
    stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh,
    stride_don, stride_dob, stride_doh,
    stride_gn, stride_gb, stride_gh,
    num_heads, nq, mask_stride, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PEEL_TAIL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One program = one query block, for one (sample, head): dQ of its rows over the segment's keys."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)  # int64: b * stride_b passes 2**31 for a batch-major caller at large B
    h = (bh % num_heads).to(tl.int64)
    q_end = tl.load(QBlocks + blk * 5 + 1)
    k_start = tl.load(QBlocks + blk * 5 + 2)
    k_end = tl.load(QBlocks + blk * 5 + 3)
    m_start = tl.load(QBlocks + blk * 5 + 4)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    rows_m = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m * stride_qn + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m * stride_don + offs_d[None, :],
                 mask=m_mask[:, None], other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * nq + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * nq + offs_m, mask=m_mask, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    KeyMask += b * mask_stride

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_tail = k_start
    if PEEL_TAIL:  # the full key blocks unmasked, then the partial one
        k_tail += (k_end - k_start) // BLOCK_N * BLOCK_N
        for n_start in range(k_start, k_tail, BLOCK_N):
            dq = _dq_key_block(dq, q, do, lse2, delta, K, V, KeyMask, n_start, k_end, stride_kn, stride_vn, offs_d,
                               qk_scale, BLOCK_M, BLOCK_N, False, HAS_KEY_MASK, DOT_FP32)
    for n_start in range(k_tail, k_end, BLOCK_N):  # masked: the tail, or every block without PEEL_TAIL
        dq = _dq_key_block(dq, q, do, lse2, delta, K, V, KeyMask, n_start, k_end, stride_kn, stride_vn, offs_d,
                           qk_scale, BLOCK_M, BLOCK_N, True, HAS_KEY_MASK, DOT_FP32)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_gb + h * stride_gh + rows_m * stride_gn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------------
# launch configuration and block tables
# ----------------------------------------------------------------------------------------------------
# Tile candidates per architecture, kernel, dtype and head dim. The first of each list is the static
# pick; with MBT_FAST_AUTOTUNE=1 a GPU times every candidate once per shape and keeps the fastest
# (``_tuned``). Every candidate compiles without spills (static report, tests/kernels/test_attention_aot.py).
# The picks, by static counts (Triton 3.8, bf16, D = 64; kernels/report.py):
# * sm_80 forward: 128x32 tiles on 4 warps, 32 query rows per warp, as FlashAttention-2 on A100: LDSM
#   per HMMA in the main loop 24/64 = 0.38 instead of 36/64 = 0.56 for 128x64 on 8 warps, at the same
#   8 resident warps per SM (2 CTAs x 4 by registers, 254 each, against 1 CTA x 8 at 173);
# * sm_90 forward: 128x64 on 8 warps (two warpgroups of wgmma, 121 registers, 2 CTAs per SM);
# * dK/dV: 128 keys per CTA on 8 warps on both (Q and dO stream once per 128 keys); on sm_90 the 4-warp
#   64-key tile fits 3 CTAs per SM (142 registers) but reads Q and dO twice as often, and 16 query rows
#   per step fit 2 CTAs (120 registers) at 57 % more instructions per query row: candidates;
# * dQ: 128 query rows on 8 warps (sm_80 0.67 LDSM/HMMA at 2 CTAs; 0.58 with 64 keys but 1 CTA).
def _cfg(block_m: int, block_n: int, warps: int, stages: int, tma: bool = False, overlap_pv: bool = False) -> dict:
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return {**cfg, **({"TMA": True} if tma else {}), **({"OVERLAP_PV": True} if overlap_pv else {})}


_PRE = dict(BLOCK_M=64, num_warps=4, num_stages=1)  # the delta row reduction: one config everywhere
_INTERPRETER = {"fwd": _cfg(32, 32, 4, 1), "pre": _PRE, "dkdv": _cfg(32, 32, 4, 1), "dq": _cfg(32, 32, 4, 1)}
ARCHS = (80, 90)


def _candidates(head_dim: int, dtype: torch.dtype, arch: int) -> dict:
    """``{kernel: [config, ...]}`` for a GPU of table ``arch`` (80: compute capability 8.x, 90: 9.0 and
    newer); the first config of each kernel is the static pick."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch}")
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units: small tiles keep all of it in registers
        # (32 keys spilled 8 bytes in the dK/dV kernel at D = 32 on sm_80: 16 there as at D = 128)
        tile = _cfg(32, 32 if head_dim == 64 else 16, 4, 2)
        fwd = dict(tile, BLOCK_N=32, num_warps=8) if head_dim == 128 else tile
        return {"fwd": [fwd], "pre": [_PRE], "dkdv": [tile], "dq": [tile]}
    if head_dim == 128:
        fwd = [_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)]
        if arch == 90:
            fwd.append(_cfg(128, 64, 8, 2, tma=True, overlap_pv=True))
        return {"fwd": fwd, "pre": [_PRE],
                "dkdv": [_cfg(32, 64, 4, 2), _cfg(32, 32, 4, 2)],
                "dq": [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)]}
    fwd = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3)]
    if arch == 80 and head_dim == 64:
        fwd = [fwd[2], fwd[0], fwd[1]]
    if arch == 90:  # TMA loads, and P V overlapping the next softmax: chosen only by timing on the GPU
        fwd += [_cfg(128, 64, 8, 3, tma=True), _cfg(128, 128, 8, 2, tma=True),
                _cfg(128, 64, 8, 3, tma=True, overlap_pv=True), _cfg(128, 128, 8, 2, tma=True, overlap_pv=True)]
    # (on sm_80 the 4-warp 64-key tile spills 8 bytes with 3 stages, and at D = 32 with 2 as well)
    dkdv = [_cfg(32, 128, 8, 3)] + ([_cfg(32, 64, 4, 3), _cfg(64, 64, 4, 2), _cfg(16, 128, 8, 3)] if arch == 90
                                    else [_cfg(32, 64, 4, 2)] if head_dim == 64 else [])
    return {"fwd": fwd, "pre": [_PRE], "dkdv": dkdv, "dq": [_cfg(128, 32, 8, 3), _cfg(64, 32, 4, 3)]}


def _configs(head_dim: int, dtype: torch.dtype, interpreting: bool, arch: int = 90) -> dict:
    """The static pick of every kernel (``@triton.autotune`` needs a driver, and the interpreter has none).

    The interpreter gets 32-row tiles so that short ragged test cases cross several block edges;
    the GPU tiles run under the interpreter too (test_gpu_block_sizes).
    """
    if interpreting:
        return dict(_INTERPRETER)
    return {kernel: cands[0] for kernel, cands in _candidates(head_dim, dtype, arch).items()}


@lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    """The tile table of a CUDA device: 80 for compute capability 8.x, 90 for 9.0 and newer (their
    largest tiles fit the 99 KiB of shared memory of sm_86/sm_89/sm_120 too)."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ValueError(f"q: the Triton attention kernels need compute capability 8.0 or newer (bf16 tensor "
                         f"cores, cp.async), got {major}.{minor} on {device}")
    return 80 if major < 9 else 90


_AUTOTUNE: bool | None = None  # set by autotune(): overrides the environment variable


def autotuning() -> bool:
    """Whether launches time every tile candidate once per shape (``MBT_FAST_AUTOTUNE=1``). Off by
    default: the winner may differ between processes, and with it the summation order, so results
    are bitwise repeatable only without it."""
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return os.environ.get("MBT_FAST_AUTOTUNE", "0") not in ("", "0")


@contextlib.contextmanager
def autotune(enabled: bool = True):
    """Autotuning on (or off) inside the block, whatever ``MBT_FAST_AUTOTUNE`` says (benchmarks)."""
    global _AUTOTUNE
    before, _AUTOTUNE = _AUTOTUNE, enabled
    try:
        yield
    finally:
        _AUTOTUNE = before


def tuned_tiles(segments: tuple, batch: int) -> dict:
    """``{kernel: tile name}`` of the autotuned winners for a segment table and batch (empty if none)."""
    return {k[0]: _tile_name(c) for k, c in _TUNED.items() if k[4][:2] == (segments, batch)}


def _bench(fn) -> float:
    """Milliseconds of one ``fn()`` on the GPU (median of repeats, Triton's CUDA-event timer)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


_TUNED: dict = {}


def _tuned(kernel: str, q: torch.Tensor, key: tuple, run, cfgs: dict | None, tma_ok=lambda: False) -> dict:
    """The tile config of ``kernel`` for this launch: ``cfgs``'s if given (tests), the interpreter's, the
    static pick of the device's table, or with autotuning the fastest candidate, timed once per ``key``
    (the shape) by calling ``run(config)`` and kept for the process. TMA candidates (never the static
    pick) take part only when ``tma_ok()`` says the tensors allow it, asked only when tuning: the
    untuned launch does no host work for them. Never times inside a CUDA-graph capture (the static
    pick is used there)."""
    if cfgs is not None:
        return cfgs[kernel]
    D, dtype = q.shape[-1], q.dtype
    if triton_interpreting() and q.device.type == "cpu":
        return _INTERPRETER[kernel]
    arch = _arch(q.device)
    cands = _candidates(D, dtype, arch)[kernel]
    if len(cands) == 1 or not autotuning() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return cands[0]
    tma = tma_ok()
    cands = [c for c in cands if tma or not c.get("TMA")]
    tkey = (kernel, arch, dtype, D, key, tma)
    if tkey not in _TUNED:
        _TUNED[tkey] = min(cands, key=lambda c: _bench(lambda: run(c)))
    return _TUNED[tkey]


def _peel_tail(dtype: torch.dtype) -> bool:
    """Whether the kernels run a segment's full blocks without masks and its partial last block apart
    (fp16/bf16). Not for fp32: its IEEE dots are unrolled FFMA (500-2,000 per block), so a second copy
    of the body made ptxas spill in 4 of the 18 fp32 kernels (sm_80/sm_90, head dims 32-128), and the
    4-8 selects per iteration it saves are under 1% of the loop (static counts, Triton 3.8)."""
    return dtype != torch.float32


def _query_block_table(segments: tuple, block_m: int) -> list:
    """Rows ``(q_start, q_end, k_start, k_end, first_row)``: one per query block of every segment."""
    return [(qs, qe, ks, ke, m) for qs, qe, ks, ke in segments for m in range(qs, qe, block_m)]


def _key_block_table(segments: tuple, block_n: int) -> tuple[list, list]:
    """Key blocks and the query ranges each one must visit.

    The key axis is cut at every ``k_start``/``k_end``; inside one piece the set of segments that see
    a key is fixed. Returns rows ``(first_row, piece_end, first, last)`` and the list of
    ``(q_start, q_end)`` that ``[first, last)`` indexes. Keys no segment sees get no block (grad 0).
    """
    cuts = sorted({c for _, _, ks, ke in segments for c in (ks, ke)})
    blocks, seg_q = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        seen_by = [(qs, qe) for qs, qe, ks, ke in segments if ks <= lo and hi <= ke]
        if not seen_by:
            continue
        first = len(seg_q)
        seg_q += seen_by
        blocks += [(n, hi, first, len(seg_q)) for n in range(lo, hi, block_n)]
    return blocks, seg_q


@lru_cache(maxsize=64)
def _tables(segments: tuple, kind: str, block_m: int, block_n: int, device: str):
    """Block tables as int32 tensors on ``device``, built once per layout (no GPU work at import)."""
    if kind == "q":
        return torch.tensor(_query_block_table(segments, block_m), dtype=torch.int32).to(device)
    blocks, seg_q = _key_block_table(segments, block_n)
    return (torch.tensor(blocks, dtype=torch.int32).reshape(-1, 4).to(device),
            torch.tensor(seg_q, dtype=torch.int32).reshape(-1, 2).to(device))


@lru_cache(maxsize=256)
def _gaps(segments: tuple, n: int, col: int) -> tuple:
    """The row ranges of ``[0, n)`` that no segment's columns ``col, col+1`` cover: their outputs and
    gradients are zero, and only they are zero-filled (a unimodal layer's bottleneck rows, not the
    whole buffer)."""
    gaps, reached = [], 0
    for start, end in sorted((row[col], row[col + 1]) for row in segments):
        if start > reached:
            gaps.append((reached, start))
        reached = max(reached, end)
    if reached < n:
        gaps.append((reached, n))
    return tuple(gaps)


def _zero_rows(t: torch.Tensor, gaps: tuple, dim: int = 0) -> torch.Tensor:
    """``t`` with its rows (along ``dim``) in ``gaps`` set to zero, in place."""
    for a, b in gaps:
        t.narrow(dim, a, b - a).zero_()
    return t


def _new_rows(shape, dtype, device, gaps: tuple, dim: int = 0) -> torch.Tensor:
    """An empty tensor whose rows (along ``dim``) in ``gaps`` are zero."""
    return _zero_rows(torch.empty(shape, dtype=dtype, device=device), gaps, dim)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _tma_aligned(t: torch.Tensor) -> bool:
    """A TMA descriptor's rules: 16-byte aligned start and strides (the last stride is 1 already)."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether the TMA candidates may run on these tensors: CUDA tensors that TMA can read."""
    return all(t.is_cuda and _tma_aligned(t) for t in ts)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int) -> tuple:
    """``(B, N, H, D)`` TMA descriptors of ``[N, B, H, D]`` keys and values (any strides, D stride 1);
    one box is one full key block of one (sample, head)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, B, H, D = k.shape
    return tuple(TensorDescriptor(t, [B, n, H, D], [t.stride(1), t.stride(0), t.stride(2), 1], [1, block_n, 1, D])
                 for t in (k, v))


def _mask_args(key_mask, dummy: torch.Tensor) -> tuple:
    """(pointer, row stride, HAS_KEY_MASK): the bool ``[B, Nk]`` mask as uint8 rows, or an unread dummy."""
    if key_mask is None:
        return dummy, 0, False
    m = key_mask.contiguous().view(torch.uint8)
    return m, m.stride(0), True


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _mbt_attention_fwd(q, k, v, segments: tuple, scale: float, configs: dict | None = None, key_mask=None):
    """Returns ``out [Nq, B, H, D]`` (dtype of q) and ``lse [B, H, Nq]`` fp32 (natural log).
    ``configs``: tile configs by kernel name (tests), instead of the device's (``_tuned``)."""
    q, k, v = map(_unit_last_stride, (q, k, v))
    nq, B, H, D = q.shape
    q_gaps = _gaps(segments, nq, 0)
    out = _new_rows(q.shape, q.dtype, q.device, q_gaps)
    lse = _new_rows((B, H, nq), torch.float32, q.device, q_gaps, dim=2)  # never read for gap rows; defined anyway

    def run(cfg):
        table = _tables(segments, "q", cfg["BLOCK_M"], 0, str(q.device))
        mask, mask_stride, has_mask = _mask_args(key_mask, table)
        tma = cfg.get("TMA", False)
        descs = _kv_descriptors(k, v, cfg["BLOCK_N"]) if tma else (k, v)  # unread without TMA
        _mbt_attention_fwd_kernel[(table.shape[0], B * H)](
            q, k, v, out, lse, table, mask, *descs,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            H, nq, mask_stride, scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=D, SCALE_POSITIVE=scale >= 0,
            PEEL_TAIL=_peel_tail(q.dtype), HAS_KEY_MASK=has_mask, TMA=tma,
            OVERLAP_PV=cfg.get("OVERLAP_PV", False), DOT_FP32=triton_interpreting(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    run(_tuned("fwd", q, (segments, B, H, key_mask is not None), run, configs, lambda: _tma_ok(k, v)))
    return out, lse


def _mbt_attention_bwd(do, q, k, v, out, lse, segments: tuple, scale: float, configs: dict | None = None,
                       grads: tuple | None = None, key_mask=None):
    """Returns ``dq, dk, dv`` (contiguous, dtypes of q, k, v); rows no segment touches get 0.
    ``grads``: three tensors shaped like q, k, v (D stride 1, dk and dv with equal strides) to write
    them into instead, such as the views of one packed ``[N, B, 3, H, D]`` gradient."""
    interpreting = triton_interpreting()
    do, q, k, v = map(_unit_last_stride, (do, q, k, v))
    nq, B, H, D = q.shape
    nk = k.shape[0]
    dev = str(q.device)
    shape_key = (segments, B, H, key_mask is not None)

    delta = torch.empty(B, H, nq, dtype=torch.float32, device=q.device)
    pre = _tuned("pre", q, shape_key, None, configs)
    _mbt_attention_bwd_preprocess_kernel[(triton.cdiv(nq, pre["BLOCK_M"]), B * H)](
        out, do, delta, *_strides(out), *_strides(do), H, nq,
        BLOCK_M=pre["BLOCK_M"], BLOCK_D=D, num_warps=pre["num_warps"], num_stages=pre["num_stages"])

    q_gaps, k_gaps = _gaps(segments, nq, 0), _gaps(segments, nk, 2)
    if grads is None:
        dq = _new_rows(q.shape, q.dtype, q.device, q_gaps)
        dk = _new_rows(k.shape, k.dtype, k.device, k_gaps)
        dv = _new_rows(v.shape, v.dtype, v.device, k_gaps)
    else:
        dq, dk, dv = _zero_rows(grads[0], q_gaps), _zero_rows(grads[1], k_gaps), _zero_rows(grads[2], k_gaps)
    assert dk.stride() == dv.stride() and dq.stride(-1) == dk.stride(-1) == 1

    def run_dkdv(c):
        kblocks, seg_q = _tables(segments, "k", 0, c["BLOCK_N"], dev)
        mask, mask_stride, has_mask = _mask_args(key_mask, kblocks)
        _mbt_attention_bwd_dkdv_kernel[(kblocks.shape[0], B * H)](
            q, k, v, do, dk, dv, lse, delta, kblocks, seg_q, mask,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
            H, nq, mask_stride, scale,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=D, PEEL_TAIL=_peel_tail(q.dtype),
            HAS_KEY_MASK=has_mask, DOT_FP32=interpreting, num_warps=c["num_warps"], num_stages=c["num_stages"])

    def run_dq(c):
        qblocks = _tables(segments, "q", c["BLOCK_M"], 0, dev)
        mask, mask_stride, has_mask = _mask_args(key_mask, qblocks)
        _mbt_attention_bwd_dq_kernel[(qblocks.shape[0], B * H)](
            q, k, v, do, dq, lse, delta, qblocks, mask,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            H, nq, mask_stride, scale,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_D=D, PEEL_TAIL=_peel_tail(q.dtype),
            HAS_KEY_MASK=has_mask, DOT_FP32=interpreting, num_warps=c["num_warps"], num_stages=c["num_stages"])

    run_dkdv(_tuned("dkdv", q, shape_key, run_dkdv, configs))
    run_dq(_tuned("dq", q, shape_key, run_dq, configs))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# the launchers as torch.library ops: opaque to torch.compile, so the host-side block tables stay out
# of the graph (cached per segment table and device; no host work per call after the first)
# ----------------------------------------------------------------------------------------------------
def _rows(flat: list[int]) -> tuple:
    return tuple(tuple(flat[i:i + 4]) for i in range(0, len(flat), 4))


@torch.library.custom_op("mbt_fast_triton::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[int],
                      scale: float, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _mbt_attention_fwd(q, k, v, _rows(segments), scale, key_mask=key_mask)


@_attention_fwd_op.register_fake
def _(q, k, v, segments, scale, key_mask=None):
    nq, B, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, nq, dtype=torch.float32)


@torch.library.custom_op("mbt_fast_triton::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, segments: list[int], scale: float,
                      key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mbt_attention_bwd(do, q, k, v, out, lse, _rows(segments), scale, key_mask=key_mask)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, segments, scale, key_mask=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("mbt_fast_triton::attention_bwd_qkv", mutates_args=())
def _attention_bwd_qkv_op(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          segments: list[int], scale: float, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The backward for a packed ``qkv [N, B, 3, H, D]``: dq, dk, dv written into one gradient of that
    shape, so autograd does not stack three tensors into it (a copy of the whole buffer)."""
    grad = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _mbt_attention_bwd(do, *qkv.unbind(2), out, lse, _rows(segments), scale, grads=grad.unbind(2), key_mask=key_mask)
    return grad


@_attention_bwd_qkv_op.register_fake
def _(do, qkv, out, lse, segments, scale, key_mask=None):
    return qkv.new_empty(qkv.shape)


# ----------------------------------------------------------------------------------------------------
# autograd and the op
# ----------------------------------------------------------------------------------------------------
class MBTAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, the output and the fp32 LSE; the backward recomputes P block by block.
    ``configs`` (block sizes, tests only) calls the launchers directly instead of the ops."""

    @staticmethod
    def forward(ctx, q, k, v, segments: tuple, scale: float, configs: dict | None = None, key_mask=None):
        if configs is None:
            out, lse = torch.ops.mbt_fast_triton.attention_fwd(q, k, v, [c for row in segments for c in row], scale,
                                                               key_mask)
        else:
            out, lse = _mbt_attention_fwd(q, k, v, segments, scale, configs, key_mask)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.segments, ctx.scale, ctx.configs = segments, scale, configs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        if ctx.configs is None:
            flat = [c for row in ctx.segments for c in row]
            dq, dk, dv = torch.ops.mbt_fast_triton.attention_bwd(grad_out, q, k, v, out, lse, flat, ctx.scale, key_mask)
        else:
            dq, dk, dv = _mbt_attention_bwd(grad_out, q, k, v, out, lse, ctx.segments, ctx.scale, ctx.configs,
                                            key_mask=key_mask)
        return dq, dk, dv, None, None, None, None


class MBTAttentionQKVFunction(torch.autograd.Function):
    """The same attention for a packed ``qkv [N, B, 3, H, D]``: saves qkv itself, and its backward
    returns the packed gradient (``attention_bwd_qkv``)."""

    @staticmethod
    def forward(ctx, qkv, segments: tuple, scale: float, key_mask=None):
        flat = [c for row in segments for c in row]
        out, lse = torch.ops.mbt_fast_triton.attention_fwd(*qkv.unbind(2), flat, scale, key_mask)
        ctx.save_for_backward(qkv, out, lse, key_mask)
        ctx.flat, ctx.scale = flat, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse, key_mask = ctx.saved_tensors
        grad = torch.ops.mbt_fast_triton.attention_bwd_qkv(grad_out, qkv, out, lse, ctx.flat, ctx.scale, key_mask)
        return grad, None, None, None


def _check(q, k, v, segments) -> tuple:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions [N, B, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: expected one of float16, bfloat16, float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {t.device}")
    if k.shape != v.shape or k.shape[1:] != q.shape[1:]:
        raise ValueError(f"q, k, v: expected [Nq, B, H, D] and two equal [Nk, B, H, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q: expected head dim (last dimension) in {HEAD_DIMS}, got {q.shape[-1]}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and triton_interpreting()):
        raise ValueError(f"q: the Triton attention kernel needs CUDA tensors (or CPU tensors under "
                         f"TRITON_INTERPRET=1), got device {q.device}")
    # a tuple table (what mbt_fast.ops passes) is read as is: no tensor round trip, nothing to trace
    seg = [list(r) for r in segments] if isinstance(segments, tuple) else torch.as_tensor(segments).reshape(-1, 4).tolist()
    if not seg:
        raise ValueError("segments: expected at least one (q_start, q_end, k_start, k_end) row, got none")
    for qs, qe, ks, ke in seg:
        if not (0 <= qs < qe <= q.shape[0] and 0 <= ks < ke <= k.shape[0]):
            raise ValueError(f"segments: row {(qs, qe, ks, ke)} is empty or outside q rows [0, {q.shape[0]}) "
                             f"/ k rows [0, {k.shape[0]})")
    seg.sort()
    if any(a[1] > b[0] for a, b in zip(seg[:-1], seg[1:])):
        raise ValueError(f"segments: query ranges must not overlap, got {seg}")
    return tuple(tuple(int(x) for x in row) for row in seg)


def mbt_attention(q, k, v, segments, scale: float | None = None, key_mask=None):
    """Segment-masked attention (see the module docstring); differentiable in q, k and v."""
    seg = _check(q, k, v, segments)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return MBTAttentionFunction.apply(q, k, v, seg, scale, None, check_key_mask(key_mask, q.shape[1], k.shape[0], q))


def mbt_attention_qkv(qkv, segments, scale: float | None = None, key_mask=None):
    """``mbt_attention(*qkv.unbind(2), segments, scale)`` for a packed ``qkv [N, B, 3, H, D]``, whose
    gradient comes back packed (no stack copy); differentiable in qkv."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv: expected a tensor [N, B, 3, H, D], got {got}")
    seg = _check(*qkv.unbind(2), segments)
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if scale is None else float(scale)
    return MBTAttentionQKVFunction.apply(qkv, seg, scale, check_key_mask(key_mask, qkv.shape[1], qkv.shape[0], qkv))


# ----------------------------------------------------------------------------------------------------
# ahead-of-time compilation (static performance report)
# ----------------------------------------------------------------------------------------------------
def aot_specs(dtype: torch.dtype = torch.float16, head_dim: int = 64, arch: int = 90,
              candidates: bool = False) -> list[dict]:
    """The four kernels at the MBT-B configuration (head dim 64, 12 heads), with the static tile pick
    of the ``arch`` table, or with ``candidates`` every tile candidate (``config``: its index in the
    autotune list, 0 = the static pick).

    Each dict feeds ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target, options)``.
    ``attrs`` marks every pointer and every stride (``divisible_by_16`` lists the strides) 16-divisible,
    which is what ``@triton.jit`` specialises on a GPU for MBT-B tensors (16-byte aligned storage,
    strides multiples of D); without it the compiler must assume unaligned rows, cannot vectorise
    loads and spills. The head count (12) is a runtime argument and does not change the code.
    Needs a process without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
    """
    if dtype not in DTYPES:
        raise TypeError(f"dtype: expected one of float16, bfloat16, float32, got {dtype}")
    if not isinstance(_mbt_attention_fwd_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("aot_specs: the kernels were defined under TRITON_INTERPRET=1 and cannot be compiled; "
                           "import mbt_fast.kernels.attention in a process without TRITON_INTERPRET")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")
    D = head_dim
    ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    cands = _candidates(D, dtype, arch)
    strides = lambda *names: {f"stride_{n}{x}": "i32" for n in names for x in "nbh"}  # noqa: E731
    scalars = {"num_heads": "i32", "nq": "i32", "mask_stride": "i32", "sm_scale": "fp32"}

    def spec(fn, direction, sig, cfg, consts, index):
        names = list(fn.arg_names)
        divisible = [a for a in sig if a.startswith("stride_")]  # pointers are 16-byte aligned as well
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items()
                 if t.startswith("*") or a in divisible}
        return {"kernel": fn.__name__, "direction": direction, "fn": fn,
                "signature": {**sig, **{c: "constexpr" for c in consts}}, "constexprs": consts,
                "divisible_by_16": divisible, "attrs": attrs, "config": index, "tile": _tile_name(cfg),
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}

    def blocks(cfg):
        return {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": D, "PEEL_TAIL": _peel_tail(dtype),
                "HAS_KEY_MASK": False, "DOT_FP32": False}

    def kv_descs(cfg):  # what the launcher passes as KDesc/VDesc: descriptors with TMA, else k and v again
        desc = f"tensordesc<{ty[1:]}[1,{cfg['BLOCK_N']},1,{D}]>" if cfg.get("TMA") else ty
        return {"KDesc": desc, "VDesc": desc}

    def each(kernel):  # (index, config) of the kernel's candidates, or of its static pick alone
        return list(enumerate(cands[kernel] if candidates else cands[kernel][:1]))

    return [
        *(spec(_mbt_attention_fwd_kernel, "fwd",
               {"Q": ty, "K": ty, "V": ty, "Out": ty, "Lse": "*fp32", "QBlocks": "*i32", "KeyMask": "*u8", **kv_descs(c),
                **strides("q", "k", "v", "o"), **scalars}, c,
               {**blocks(c), "SCALE_POSITIVE": True, "TMA": c.get("TMA", False),
                "OVERLAP_PV": c.get("OVERLAP_PV", False)}, i)
          for i, c in each("fwd")),
        *(spec(_mbt_attention_bwd_preprocess_kernel, "bwd",
               {"Out": ty, "DO": ty, "Delta": "*fp32", **strides("o", "do"), "num_heads": "i32", "nq": "i32"},
               c, {"BLOCK_M": c["BLOCK_M"], "BLOCK_D": D}, i) for i, c in each("pre")),
        *(spec(_mbt_attention_bwd_dkdv_kernel, "bwd",
               {"Q": ty, "K": ty, "V": ty, "DO": ty, "DK": ty, "DV": ty, "Lse": "*fp32", "Delta": "*fp32",
                "KBlocks": "*i32", "SegQ": "*i32", "KeyMask": "*u8", **strides("q", "k", "v", "do", "g"), **scalars},
               c, blocks(c), i) for i, c in each("dkdv")),
        *(spec(_mbt_attention_bwd_dq_kernel, "bwd",
               {"Q": ty, "K": ty, "V": ty, "DO": ty, "DQ": ty, "Lse": "*fp32", "Delta": "*fp32", "QBlocks": "*i32",
                "KeyMask": "*u8", **strides("q", "k", "v", "do", "g"), **scalars}, c, blocks(c), i)
          for i, c in each("dq")),
    ]


def _tile_name(cfg: dict) -> str:
    """``128x64 w8 s3``: block rows x block columns (the preprocess: rows only), warps, stages, and
    ``tma`` where the full key blocks come by TMA, ``overlap`` where P V overlaps the next softmax."""
    cols = f"x{cfg['BLOCK_N']}" if "BLOCK_N" in cfg else ""
    flags = "".join(f" {name}" for key, name in (("TMA", "tma"), ("OVERLAP_PV", "overlap")) if cfg.get(key))
    return f"{cfg['BLOCK_M']}{cols} w{cfg['num_warps']} s{cfg['num_stages']}{flags}"
