"""Triton multimodal bottleneck attention (kernels/attention.py) under the interpreter, on the CPU.

Every case compares the kernel's output and dq/dk/dv with the fp32 reference by the DESIGN.md rule
``max|out - ref32| <= 2 * max|eager_lowp - ref32| + floor[dtype]``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined; harmless under conftest

import pytest
import torch

from mbt_fast import ops
from mbt_fast.kernels import attention as attn
from mbt_fast.kernels.attention import MBTAttentionFunction, mbt_attention, mbt_attention_ref
from mbt_fast.layout import PackedLayout
from compare import FLOORS  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _inputs(nq, nk, B, H, D, dtype, memory, seed=0):
    """q, k, v ``[N, B, H, D]`` views in the requested memory layout (all differentiable)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()  # noqa: E731
    if memory == "packed":  # views of one [N, B, 3, H, D] qkv buffer: strides (B*3*H*D, 3*H*D, D, 1)
        assert nq == nk
        return rand(nq, B, 3, H, D).unbind(2)
    if memory == "permuted":  # batch-major storage seen token-major: N is not the outer dimension
        return tuple(rand(B, H, n, D).permute(2, 0, 1, 3) for n in (nq, nk, nk))
    if memory == "d_strided":  # D stride != 1: the launcher must copy
        assert H > 1
        return tuple(rand(n, B, D, H).transpose(2, 3) for n in (nq, nk, nk))
    return tuple(rand(n, B, H, D) for n in (nq, nk, nk))


def _assert_close(name, got, ref32, eager, floor):
    err = (got.float() - ref32).abs().max().item()
    eager_err = (eager.float() - ref32).abs().max().item()
    bound = 2 * eager_err + floor
    assert err <= bound, f"{name}: max|triton - ref32| = {err:.3e} > 2 * max|eager - ref32| ({eager_err:.3e}) + {floor}"


def _run_and_check(q, k, v, segments, scale=None, grad=True, fn=None, ref_kw=None):
    """Kernel vs fp32 reference (and vs the same reference run in q's dtype for the tolerance)."""
    ref_kw = ref_kw or {}
    dtype = q.dtype
    fwd_floor, bwd_floor = FLOORS[dtype]
    out = mbt_attention(q, k, v, segments, scale) if fn is None else fn(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    leaves_lo = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = mbt_attention_ref(*leaves32, segments, scale, **ref_kw)
    eager = mbt_attention_ref(*leaves_lo, segments, scale, dtype=dtype, **ref_kw)
    _assert_close("out", out, ref, eager, fwd_floor)
    if not grad:
        return out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads32 = torch.autograd.grad(ref, leaves32, g.float())
    grads_lo = torch.autograd.grad(eager, leaves_lo, g)
    for name, got, r, e in zip(("dq", "dk", "dv"), grads, grads32, grads_lo):
        assert got.shape == r.shape and got.dtype == dtype
        _assert_close(name, got, r, e, bwd_floor)
    return out, grads


def _single(nq, nk):
    return [(0, nq, 0, nk)]


# (segments, nq, nk, B, H, D, dtype, memory): each dtype meets each head dim once; ragged lengths
# 1, 7, 97, 197, 406; packed layouts with 1-8 bottlenecks, fused and unfused; batch 1 and 3.
CASES = {
    "q1_k7": (_single(1, 7), 1, 7, 1, 1, 32, F32, "contiguous"),
    "q7_k1_batch3": (_single(7, 1), 7, 1, 3, 2, 64, F16, "permuted"),
    "q97_k197": (_single(97, 197), 97, 197, 1, 1, 128, BF16, "contiguous"),
    "q197_k97_d_strided": (_single(197, 97), 197, 97, 1, 2, 64, F32, "d_strided"),
    "q406_k406": (_single(406, 406), 406, 406, 1, 1, 64, F16, "packed"),
    "offset_segments": ([(3, 40, 5, 50), (45, 60, 0, 2)], 64, 50, 2, 1, 32, F16, "contiguous"),
    "overlapping_keys": ([(0, 20, 0, 30), (25, 60, 10, 64), (60, 64, 0, 5)], 64, 64, 2, 1, 32, F16, "packed"),
}
# packed qkv buffers of PackedLayouts: (modality tokens, n_bottleneck, fused, B, H, D, dtype)
_LAYOUTS = {
    "spec7_rgb97_nb1_fused": ((7, 97), 1, True, 3, 2, 32, BF16),
    "spec97_rgb40_nb4_unfused": ((97, 40), 4, False, 1, 1, 64, F32),
    "three_mod_nb8_fused": ((1, 7, 33), 8, True, 2, 1, 128, F16),
    "spec23_rgb50_nb2_unfused": ((23, 50), 2, False, 1, 1, 128, F32),
    "spec401_rgb97_nb5_fused": ((401, 97), 5, True, 1, 1, 64, BF16),  # MBT-B spectrogram side, small rgb
}
for _name, (_tokens, _nb, _fused, _B, _H, _D, _dtype) in _LAYOUTS.items():
    _layout = PackedLayout(tuple(f"m{i}" for i in range(len(_tokens))), _tokens, _nb)
    _n = _layout.total_rows
    CASES[_name] = (_layout.attn_segments(_fused), _n, _n, _B, _H, _D, _dtype, "packed")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    segments, nq, nk, B, H, D, dtype, memory = CASES[case]
    q, k, v = _inputs(nq, nk, B, H, D, dtype, memory)
    _run_and_check(q, k, v, segments)


@pytest.mark.parametrize("case", ["q97_k197", "spec7_rgb97_nb1_fused"])
def test_no_grad(case):
    segments, nq, nk, B, H, D, dtype, memory = CASES[case]
    q, k, v = (t.detach() for t in _inputs(nq, nk, B, H, D, dtype, memory))
    out = _run_and_check(q, k, v, segments, grad=False)
    assert not out.requires_grad
    with torch.no_grad():
        q.requires_grad_()
        assert not mbt_attention(q, k, v, segments).requires_grad


def test_only_q_requires_grad():
    q, k, v = _inputs(33, 20, 1, 1, 32, F32, "contiguous")
    k, v = k.detach(), v.detach()
    out = mbt_attention(q, k, v, _single(33, 20))
    (dq,) = torch.autograd.grad(out.sum(), q)
    q32 = q.detach().requires_grad_()
    (ref,) = torch.autograd.grad(mbt_attention_ref(q32, k, v, _single(33, 20)).sum(), q32)
    assert (dq - ref).abs().max() <= FLOORS[F32][1]


@pytest.mark.parametrize("scale,magnitude", [(0.3, 1.0), (0.0, 1.0), (-0.3, 4.0)])
def test_full_blocks_and_tails(scale, magnitude):
    """The kernels run a segment's full blocks unmasked and its partial last block masked: segments of
    exactly 1 and 2 interpreter blocks (32 rows, no tail), 1 row and 33 rows (tail only / one full + a
    1-row tail), on both axes. Scale 0 is a uniform softmax; a negative scale takes the row-min path of
    the unmasked loop, with scores spread over ~200 log2 units so that a row max taken on the wrong
    side overflows exp2."""
    seg = ((0, 32, 0, 64), (32, 96, 64, 65), (96, 97, 0, 33), (97, 130, 65, 130))
    q, k, v = _inputs(130, 130, 2, 2, 32, F32, "contiguous", seed=3)
    with torch.no_grad():
        q.mul_(magnitude)
        k.mul_(magnitude)
    _run_and_check(q, k, v, seg, scale=scale)


def test_many_heads_large_logits():
    """Batch 4 x 12 heads (the grid's second axis over 48 programs) with scores up to about +-30: the
    online softmax rescales across blocks without overflow, in bf16 and fp16."""
    seg = ((0, 45, 0, 70), (45, 70, 20, 70))
    for dtype in (BF16, F16):
        q, k, v = _inputs(70, 70, 4, 12, 32, dtype, "contiguous", seed=4)
        with torch.no_grad():
            q.mul_(3.0)
            k.mul_(3.0)  # |q.k| / sqrt(32) reaches ~30
        logits = torch.einsum("nbhd,mbhd->bhnm", q.float(), k.float()) / 32 ** 0.5
        assert logits.abs().max() > 25, logits.abs().max()
        _run_and_check(q, k, v, seg)


def _aten_ops(fn):
    """The aten ops ``fn()`` dispatches (forward and backward), by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    seen = []
    with Record():
        fn()
    return seen


@pytest.mark.parametrize("fused", [True, False])
def test_packed_qkv_gradient(fused):
    """``mbt_attention_qkv`` equals the per-tensor op on the views of one qkv buffer, bit for bit, and
    its backward returns qkv's gradient packed: no ``stack`` of dq, dk, dv (the per-tensor op's autograd
    stacks them, a copy of the whole buffer). Unfused, the bottleneck rows are in no segment: zero."""
    layout = PackedLayout(("spectrogram", "rgb"), (23, 41), 3)
    n = layout.total_rows
    segments = tuple(layout.attn_segments(fused))
    qkv = torch.randn(n, 2, 3, 2, 32, generator=torch.Generator().manual_seed(5)).to(BF16).requires_grad_()
    g = torch.randn(n, 2, 2, 32, generator=torch.Generator().manual_seed(6)).to(BF16)

    out = attn.mbt_attention_qkv(qkv, segments)
    ref = mbt_attention(*qkv.unbind(2), segments)
    assert torch.equal(out, ref)
    (packed,) = torch.autograd.grad(out, qkv, g)
    (stacked,) = torch.autograd.grad(ref, qkv, g)
    assert packed.shape == qkv.shape and packed.is_contiguous() and torch.equal(packed, stacked)
    if not fused:
        for m in range(layout.num_modalities):
            assert torch.count_nonzero(packed[layout.bottleneck_rows(m)]) == 0

    def backward(op):
        return lambda: torch.autograd.grad(op(), qkv, g)
    assert "stack" not in _aten_ops(backward(lambda: attn.mbt_attention_qkv(qkv, segments)))
    assert "stack" in _aten_ops(backward(lambda: mbt_attention(*qkv.unbind(2), segments)))
    _run_and_check(*qkv.detach().unbind(2), segments, fn=lambda *_: attn.mbt_attention_qkv(qkv, segments), grad=False)


def test_packed_qkv_bad_input():
    with pytest.raises(ValueError, match=r"qkv: expected a tensor \[N, B, 3, H, D\], got \(8, 1, 2, 1, 32\)"):
        attn.mbt_attention_qkv(torch.randn(8, 1, 2, 1, 32), _single(8, 8))
    with pytest.raises(ValueError, match=r"qkv: expected \[N, B, 3, H, D\], got shape \(8, 1, 4, 1, 32\)"):
        ops.mbt_attention_qkv(torch.randn(8, 1, 4, 1, 32), _single(8, 8), backend="triton")


def test_rows_outside_segments_are_zero():
    layout = PackedLayout(("spectrogram", "rgb"), (20, 30), 3)
    segments = layout.attn_segments(fused=False)  # bottleneck rows are in no segment
    n = layout.total_rows
    q, k, v = _inputs(n, n, 2, 2, 32, F16, "packed")
    out, (dq, dk, dv) = _run_and_check(q, k, v, segments, scale=0.3)
    for m in range(layout.num_modalities):
        rows = layout.bottleneck_rows(m)
        for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert torch.count_nonzero(t[rows]) == 0, f"{name}: bottleneck rows {rows} must be exactly 0"


@pytest.mark.parametrize("D,dtype,arch", [(64, F16, 90), (64, BF16, 80), (128, BF16, 90), (32, F32, 80)])
def test_gpu_block_sizes(D, dtype, arch):
    """The block sizes a GPU runs (128-row tiles), under the interpreter, across several blocks."""
    layout = PackedLayout(("spectrogram", "rgb"), (150, 9), 3)
    cfg = attn._configs(D, dtype, interpreting=False, arch=arch)
    segments = tuple(layout.attn_segments(fused=True))
    q, k, v = _inputs(layout.total_rows, layout.total_rows, 1, 2, D, dtype, "packed")
    _run_and_check(q, k, v, segments, fn=lambda q, k, v: MBTAttentionFunction.apply(q, k, v, segments, 0.125, cfg),
                   scale=0.125)


@pytest.mark.parametrize("flags", [dict(tma=True), dict(overlap_pv=True), dict(tma=True, overlap_pv=True)],
                         ids=["tma", "overlap", "tma-overlap"])
@pytest.mark.parametrize("dtype,memory,masked", [(F16, "packed", False), (BF16, "permuted", False),
                                                (BF16, "packed", True)])
def test_sm90_forward_variants(dtype, memory, masked, flags):
    """The sm_90 forward candidates: ``tma`` reads a segment's full key blocks through (B, N, H, D)
    descriptors, ``overlap`` issues block j's P V after block j+1's scores (its own prologue, tail and
    epilogue). Under the interpreter both give bitwise the output and LSE of the same tile in order with
    pointer loads, and meet the 2x rule, on segments of full blocks only, full blocks plus a tail, a
    tail alone (no full block) and a 1-row query range; batch-major strides; a key mask."""
    seg = ((0, 32, 0, 64), (32, 96, 64, 130), (96, 97, 0, 33), (97, 130, 110, 130))
    q, k, v = _inputs(130, 130, 2, 3, 32, dtype, memory, seed=5)
    mask = _random_key_mask(2, 130, seg, seed=6) if masked else None
    variant = dict(attn._INTERPRETER, fwd=attn._cfg(32, 32, 4, 1, **flags))
    assert attn._tma_aligned(k) and attn._tma_aligned(v)
    with torch.no_grad():
        got = attn._mbt_attention_fwd(q, k, v, seg, 0.2, variant, mask)
        want = attn._mbt_attention_fwd(q, k, v, seg, 0.2, attn._INTERPRETER, mask)
    for name, a, b in zip(("out", "lse"), got, want):
        assert torch.equal(a, b), f"{name}: {flags} and the in-order tile differ by {(a.float() - b.float()).abs().max():.3e}"
    ref_kw = {"key_mask": mask} if masked else {}
    _run_and_check(q, k, v, seg, scale=0.2, grad=False, ref_kw=ref_kw,
                   fn=lambda q, k, v: MBTAttentionFunction.apply(q, k, v, seg, 0.2, variant, mask))


@pytest.mark.parametrize("index", range(len(attn._candidates(64, BF16, 90)["dkdv"])))
def test_sm90_dkdv_candidates(index):
    """Every sm_90 dK/dV tile candidate (the autotune list: 16 to 64 query rows per step, 64 or 128 keys
    per program) gives the 2x-rule gradients under the interpreter, across segments with full and
    partial blocks on both axes."""
    cfg = dict(attn._INTERPRETER, dkdv=attn._candidates(64, BF16, 90)["dkdv"][index])
    seg = ((0, 40, 0, 150), (40, 150, 30, 150))
    q, k, v = _inputs(150, 150, 2, 2, 32, BF16, "packed", seed=9)
    _run_and_check(q, k, v, seg, scale=0.2, fn=lambda q, k, v: MBTAttentionFunction.apply(q, k, v, seg, 0.2, cfg))


def test_overlap_is_refused_without_the_peeled_tail():
    """fp32 runs one masked loop (no peeled tail), which the overlapped schedule does not cover: refused
    when the kernel is built, not run wrong."""
    q, k, v = _inputs(70, 70, 1, 1, 32, F32, "contiguous")
    variant = dict(attn._INTERPRETER, fwd=attn._cfg(32, 32, 4, 1, overlap_pv=True))
    with pytest.raises(Exception, match="OVERLAP_PV needs PEEL_TAIL"):
        attn._mbt_attention_fwd(q.detach(), k.detach(), v.detach(), ((0, 70, 0, 70),), 0.2, variant)


def test_tma_alignment_rule():
    """TMA candidates are offered only for tensors a descriptor can address: 16-byte aligned start and
    strides, on CUDA."""
    qkv = torch.empty(40, 2, 3, 4, 64, dtype=F16)
    assert attn._tma_aligned(qkv[:, :, 1])
    assert not attn._tma_aligned(torch.empty(40 * 2 * 4 * 64 + 1, dtype=F16)[1:].view(40, 2, 4, 64)), "start off by 2 bytes"
    assert attn._tma_aligned(torch.empty(40, 2, 4, 72, dtype=F16)[..., :64]), "144-byte row stride"
    assert not attn._tma_aligned(torch.empty(40, 2, 4, 68, dtype=F16)[..., :64]), "136-byte row stride"
    assert not attn._tma_ok(qkv[:, :, 1]), "CPU tensors never take the TMA path"


def test_lse_and_determinism():
    q, k, v = _inputs(45, 45, 2, 2, 32, F32, "packed")
    seg = ((0, 30, 0, 45), (30, 45, 30, 45))
    out1, lse = attn._mbt_attention_fwd(q.detach(), k.detach(), v.detach(), seg, 0.2)
    scores = torch.einsum("nbhd,mbhd->bhnm", q.detach(), k.detach()) * 0.2
    ref = torch.cat([scores[:, :, :30, :].logsumexp(-1), scores[:, :, 30:, 30:].logsumexp(-1)], dim=2)
    assert lse.shape == (2, 2, 45) and lse.dtype == F32
    assert (lse - ref).abs().max() < 1e-5
    g = torch.randn_like(out1)
    first = torch.autograd.grad(mbt_attention(q, k, v, seg, 0.2), (q, k, v), g)
    second = torch.autograd.grad(mbt_attention(q, k, v, seg, 0.2), (q, k, v), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "repeated backward must be bitwise equal"


def test_dispatch_through_ops():
    layout = PackedLayout(("spectrogram", "rgb"), (9, 17), 2)
    segments = layout.segments_tensor(layout.attn_segments(fused=True))
    q, k, v = _inputs(layout.total_rows, layout.total_rows, 2, 3, 64, F32, "packed")
    out = ops.mbt_attention(q, k, v, segments, backend="triton")
    ref = ops.mbt_attention(q, k, v, segments, backend="torch")
    assert (out - ref).abs().max() <= FLOORS[F32][0]
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= FLOORS[F32][1]


def test_block_tables():
    seg = ((0, 20, 0, 30), (25, 60, 10, 64), (60, 64, 0, 5))
    assert attn._query_block_table(seg, 16) == [
        (0, 20, 0, 30, 0), (0, 20, 0, 30, 16), (25, 60, 10, 64, 25), (25, 60, 10, 64, 41),
        (25, 60, 10, 64, 57), (60, 64, 0, 5, 60)]
    blocks, seg_q = attn._key_block_table(seg, 16)
    # key pieces [0,5) seen by segments 0 and 2; [5,10) by 0; [10,30) by 0 and 1; [30,64) by 1
    assert seg_q == [(0, 20), (60, 64), (0, 20), (0, 20), (25, 60), (25, 60)]
    assert blocks == [(0, 5, 0, 2), (5, 10, 2, 3), (10, 30, 3, 5), (26, 30, 3, 5), (30, 64, 5, 6),
                      (46, 64, 5, 6), (62, 64, 5, 6)]
    assert attn._gaps(seg, 64, 2) == () and attn._gaps(seg, 64, 0) == ((20, 25),)  # query rows 20..25: no segment
    assert attn._gaps(((3, 5, 0, 4), (8, 9, 6, 7)), 12, 0) == ((0, 3), (5, 8), (9, 12))
    assert attn._gaps(((3, 5, 0, 4), (8, 9, 6, 7)), 12, 2) == ((4, 6), (7, 12))


@pytest.mark.slow
def test_mbt_b_token_counts():
    """The real MBT-B fusion layer: spectrogram 401 + rgb 3137 tokens, 5 bottlenecks, fused."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    segments = tuple(layout.attn_segments(fused=True))
    n = layout.total_rows
    cfg = attn._configs(64, F16, interpreting=False)  # big GPU tiles: fewer interpreted programs
    q, k, v = _inputs(n, n, 1, 1, 64, F16, "packed")
    _run_and_check(q, k, v, segments, scale=0.125,
                   fn=lambda q, k, v: MBTAttentionFunction.apply(q, k, v, segments, 0.125, cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("dtype,fused,packed", [(BF16, True, True), (BF16, False, False), (F16, True, False),
                                                (F16, False, True)],
                         ids=["bf16-fused-qkv", "bf16-unfused-q_k_v", "fp16-fused-q_k_v", "fp16-unfused-qkv"])
def test_mbt_b_on_gpu(dtype, fused, packed):
    """The compiled GPU path, which the interpreter never runs (fp16/bf16 operands on the tensor cores,
    the GPU tiles, peeled tails), at MBT-B: batch 8, 12 heads, head dim 64, spectrogram 401 + rgb 3137
    tokens and 5 bottleneck rows; forward and backward against the fp32 reference by the 2x rule. Each
    dtype, fusion mode and entry point once (4 cases: they run inside the GPU command's test budget)."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    segments = tuple(layout.attn_segments(fused))
    n = layout.total_rows
    qkv = torch.randn(n, 8, 3, 12, 64, generator=torch.Generator().manual_seed(7)).to("cuda", dtype).requires_grad_()
    q, k, v = qkv.unbind(2)
    out = attn.mbt_attention_qkv(qkv, segments) if packed else mbt_attention(q, k, v, segments)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to("cuda", dtype)
    grads = torch.autograd.grad(out, qkv, g)[0].unbind(2)
    leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    leaves_lo = [t.detach().requires_grad_() for t in (q, k, v)]
    ref, eager = mbt_attention_ref(*leaves32, segments), mbt_attention_ref(*leaves_lo, segments, dtype=dtype)
    fwd_floor, bwd_floor = FLOORS[dtype]
    _assert_close("out", out, ref, eager, fwd_floor)
    for name, got, r, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves32, g.float()),
                               torch.autograd.grad(eager, leaves_lo, g)):
        _assert_close(name, got, r, e, bwd_floor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_autotune_on_gpu():
    """Autotuning on a real GPU (MBT-B rgb+bottleneck segment, batch 2, 12 heads, bf16): every kernel's
    winner is one of its architecture's candidates, and the tuned output and gradients meet the 2x rule
    against the fp32 reference like the static pick's; so does every forward candidate run on its own
    (on sm_90 the TMA tiles)."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    segments = tuple(sorted(tuple(r) for r in layout.attn_segments(True)))
    n = layout.total_rows
    qkv = torch.randn(n, 2, 3, 12, 64, generator=torch.Generator().manual_seed(3)).to("cuda", BF16).requires_grad_()
    with attn.autotune():
        out = mbt_attention(*qkv.unbind(2), segments)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, qkv, g)[0].unbind(2)
    cands = attn._candidates(64, BF16, attn._arch(qkv.device))
    tiles = attn.tuned_tiles(segments, 2)
    assert set(tiles) == {k for k, c in cands.items() if len(c) > 1}, tiles
    for kernel, tile in tiles.items():
        assert tile in {attn._tile_name(c) for c in cands[kernel]}, (kernel, tile)
    leaves32 = [t.detach().float().requires_grad_() for t in qkv.unbind(2)]
    leaves_lo = [t.detach().requires_grad_() for t in qkv.unbind(2)]
    ref, eager = mbt_attention_ref(*leaves32, segments), mbt_attention_ref(*leaves_lo, segments, dtype=BF16)
    _assert_close("out", out, ref, eager, FLOORS[BF16][0])
    for name, got, r, e in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves32, g.float()),
                               torch.autograd.grad(eager, leaves_lo, g)):
        _assert_close(name, got, r, e, FLOORS[BF16][1])
    assert attn._tma_ok(*qkv.unbind(2)[1:])
    with torch.no_grad():
        for c in cands["fwd"]:
            one, _ = attn._mbt_attention_fwd(*qkv.unbind(2), segments, 0.125, {"fwd": c})
            _assert_close(f"out ({attn._tile_name(c)})", one, ref, eager, FLOORS[BF16][0])


# ------------------------------------------------------------------------------------------- bad input
def _qkv(D=32, dtype=F32, n=8):
    return (torch.randn(n, 1, 1, D, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (*_qkv(D=48), _single(8, 8)), ValueError, r"head dim .* got 48"),
    (lambda: (*_qkv(dtype=torch.float64), _single(8, 8)), TypeError, r"q: expected one of float16.*float64"),
    (lambda: (*_qkv(), []), ValueError, r"segments: expected at least one"),
    (lambda: (*_qkv(), [(0, 9, 0, 8)]), ValueError, r"segments: row \(0, 9, 0, 8\)"),
    (lambda: (*_qkv(), [(0, 5, 0, 8), (4, 8, 0, 8)]), ValueError, r"query ranges must not overlap"),
    (lambda: (torch.randn(8, 1, 1, 32), torch.randn(8, 1, 1, 32), torch.randn(7, 1, 1, 32), _single(8, 7)),
     ValueError, r"q, k, v: expected"),
    (lambda: (torch.randn(8, 1, 32), *list(_qkv())[:2], _single(8, 8)), ValueError, r"q: expected 4 dimensions"),
    (lambda: (torch.randn(8, 1, 1, 32), torch.randn(8, 1, 1, 32, dtype=F16), torch.randn(8, 1, 1, 32, dtype=F16),
              _single(8, 8)), TypeError, r"q, k, v: expected one dtype"),
])
def test_bad_input(make, exc, match):
    q, k, v, seg = make()
    with pytest.raises(exc, match=match):
        mbt_attention(q, k, v, seg)


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs CUDA tensors .* got device cpu"):
        mbt_attention(*_qkv(), _single(8, 8))


def test_aot_specs_bad_dtype():
    with pytest.raises(TypeError, match=r"dtype: expected"):
        attn.aot_specs(torch.float64)


def _random_key_mask(B, nk, segments, seed):
    """About a third of the keys masked per sample, each segment's last key kept so that every query
    row keeps a key (the op's contract); with the interpreter's 32-key tiles, the first segment's first
    block is all padding (a row's running max starts at -inf) and so is a block inside the last one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, nk, generator=g) > 0.35
    mask[:, :33] = False
    mask[:, 77:109] = False
    for _, _, _, ke in segments:
        mask[:, ke - 1] = True
    return mask


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "packed"])
def test_key_mask_matches_reference(dtype, memory):
    """Padding keys (``key_mask`` False) get no weight and no gradient; ragged fused segments, batch 3."""
    segments = [(0, 37, 0, 45), (37, 45, 0, 45), (45, 130, 45, 140), (130, 140, 45, 140)]
    n, B = 140, 3
    q, k, v = _inputs(n, n, B, 2, 32, dtype, memory, seed=3)
    mask = _random_key_mask(B, n, segments, seed=4)
    out, (dq, dk, dv) = _run_and_check(q, k, v, segments, fn=lambda q, k, v: mbt_attention(q, k, v, segments, key_mask=mask),
                                       ref_kw={"key_mask": mask})
    assert (dk.float()[~mask.T] == 0).all() and (dv.float()[~mask.T] == 0).all()
    other = mask.clone()
    other[1, 50] = ~other[1, 50]  # a mask that differs in one key changes that sample's output
    assert not torch.equal(mbt_attention(q, k, v, segments, key_mask=other)[:, 1], out[:, 1])


def test_key_mask_on_the_packed_qkv_op():
    segments = ((0, 50, 0, 50), (50, 99, 50, 99))
    qkv = torch.randn(99, 2, 3, 1, 64, generator=torch.Generator().manual_seed(0)).to(F16).requires_grad_()
    mask = _random_key_mask(2, 99, segments, seed=1)
    out = attn.mbt_attention_qkv(qkv, segments, key_mask=mask)
    ref = mbt_attention(*qkv.detach().unbind(2), segments, key_mask=mask)
    assert torch.equal(out, ref)
    out.float().sum().backward()
    assert (qkv.grad[:, :, 1:][~mask.T] == 0).all()  # dk, dv of padding keys


# ---- tile tables per architecture and autotuning (GPU launch logic, driven here with fakes) ----------

@pytest.mark.parametrize("capability,table", [((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((9, 0), 90), ((12, 0), 90)])
def test_arch_table_by_capability(monkeypatch, capability, table):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert attn._arch.__wrapped__(torch.device("cuda", 0)) == table


def test_arch_below_sm80_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match=r"compute capability 8.0 or newer.*got 7.5"):
        attn._arch.__wrapped__(torch.device("cuda", 0))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A launch on a 'GPU' of table 90 (a meta tensor stands in for q), timed by ``times`` (ms per tile)."""
    times, timed = {}, []
    monkeypatch.setattr(attn, "_arch", lambda device: 90)
    monkeypatch.setattr(attn, "_TUNED", {})

    def bench(fn):
        fn()
        return times[timed[-1]]

    monkeypatch.setattr(attn, "_bench", bench)
    q = torch.empty(10, 2, 3, 64, dtype=BF16, device="meta")
    return q, times, timed


def test_static_pick_without_autotuning(monkeypatch, fake_gpu):
    q, _, timed = fake_gpu
    monkeypatch.delenv("MBT_FAST_AUTOTUNE", raising=False)
    cfg = attn._tuned("fwd", q, ("shape",), lambda c: timed.append(attn._tile_name(c)), None)
    assert cfg == attn._candidates(64, BF16, 90)["fwd"][0] and timed == []


def test_autotune_keeps_the_fastest_once_per_shape(monkeypatch, fake_gpu):
    q, times, timed = fake_gpu
    monkeypatch.setenv("MBT_FAST_AUTOTUNE", "1")
    cands = attn._candidates(64, BF16, 90)["dkdv"]
    assert len(cands) >= 2
    for i, c in enumerate(cands):  # the last candidate is the fastest
        times[attn._tile_name(c)] = 10.0 - i
    run = lambda c: timed.append(attn._tile_name(c))  # noqa: E731
    assert attn._tuned("dkdv", q, ("shape", 1), run, None) == cands[-1]
    assert timed == [attn._tile_name(c) for c in cands]  # every candidate timed once
    assert attn._tuned("dkdv", q, ("shape", 1), run, None) == cands[-1]
    assert len(timed) == len(cands), "a tuned shape is not timed again"
    attn._tuned("dkdv", q, ("shape", 2), run, None)
    assert len(timed) == 2 * len(cands), "another shape is timed on its own"
    explicit = attn._configs(64, BF16, interpreting=True)
    assert attn._tuned("dkdv", q, ("shape", 3), run, explicit) == explicit["dkdv"], "configs given: no tuning"
    assert len(timed) == 2 * len(cands)


def test_autotune_offers_tma_only_where_tma_can_read(monkeypatch, fake_gpu):
    """The sm_90 forward's TMA candidates are timed only when the launch says the tensors allow TMA
    (``_tma_ok``); the static pick never uses TMA."""
    q, times, timed = fake_gpu
    monkeypatch.setenv("MBT_FAST_AUTOTUNE", "1")
    cands = attn._candidates(64, BF16, 90)["fwd"]
    tma = [attn._tile_name(c) for c in cands if c.get("TMA")]
    assert tma and not cands[0].get("TMA")
    for i, c in enumerate(cands):  # a TMA candidate is the fastest
        times[attn._tile_name(c)] = 1.0 if c.get("TMA") else 5.0 + i
    run = lambda c: timed.append(attn._tile_name(c))  # noqa: E731
    assert not attn._tuned("fwd", q, ("shape",), run, None, tma_ok=lambda: False).get("TMA")
    assert not set(timed) & set(tma), timed
    assert attn._tuned("fwd", q, ("shape",), run, None, tma_ok=lambda: True).get("TMA")
    assert set(tma) <= set(timed)
    assert not any(c.get("TMA") for k, cs in attn._candidates(64, BF16, 80).items() for c in cs), "TMA is sm_90's"


def test_interpreter_uses_its_small_tiles(monkeypatch):
    monkeypatch.setenv("MBT_FAST_AUTOTUNE", "1")
    q = torch.empty(10, 2, 3, 64, dtype=F16)
    assert attn._tuned("fwd", q, ("shape",), None, None) == attn._configs(64, F16, interpreting=True)["fwd"]
