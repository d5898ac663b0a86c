"""The CUDA attention kernels (csrc/attention) vs an fp32 reference with the DESIGN.md section 6 rule
``max|out - ref32| <= 2 * max|eager_lowp - ref32| + floor[dtype]``, forward output and dQ/dK/dV.

Backend ``cuda-emu`` runs the kernel sources on the CPU through csrc/emu (default suite); the same tests
run on the real extension with a GPU (marked gpu, skipped without one)."""
import math

import pytest
import torch

from mbt_fast import ops, torch_ops
from mbt_fast.layout import PackedLayout
from compare import check

RAGGED = (1, 7, 97, 197)  # one self-attention segment per length, all in one launch


def _device(backend):
    return "cpu" if backend == "cuda-emu" else "cuda"


def _run(fn, tensors, dout):
    """Output and input gradients of fn(*tensors), all as fp32 CPU tensors."""
    leaves = [t.detach().clone().requires_grad_(dout is not None) for t in tensors]
    out = fn(*leaves)
    if dout is None:
        return [out.detach().float().cpu()]
    out.backward(dout.to(out.dtype))
    return [out.detach().float().cpu()] + [t.grad.float().cpu() for t in leaves]


def _compare(backend, q, k, v, segs, dtype, backward=True, dout=None, key_mask=None):
    """q, k, v fp32 CPU masters; runs reference (fp32), eager (dtype) and the kernel (dtype)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    seg_t = tuple(tuple(int(x) for x in row) for row in torch.as_tensor(segs).reshape(-1, 4).tolist())
    if backward and dout is None:
        dout = torch.randn(q.shape)
    ref = _run(lambda a, b, c: torch_ops.mbt_attention(a, b, c, seg_t, scale, key_mask=key_mask), (q, k, v),
               dout if backward else None)
    low = [t.to(dtype) for t in (q, k, v)]
    eager = _run(lambda a, b, c: torch_ops.mbt_attention(a, b, c, seg_t, scale, key_mask=key_mask), low,
                 dout if backward else None)
    dev = _device(backend)
    mask = None if key_mask is None else key_mask.to(dev)
    got = _run(lambda a, b, c: ops.mbt_attention(a, b, c, seg_t, key_mask=mask, backend=backend),
               [t.to(dev) for t in low], dout.to(dev) if backward else None)
    for name, g, r, e, bwd in zip(("out", "dq", "dk", "dv"), got, ref, eager, (False, True, True, True)):
        check(name, g, r, e, dtype, bwd)
    return got


def _ragged_segments(lengths):
    segs, start = [], 0
    for n in lengths:
        segs.append((start, start + n, start, start + n))
        start += n
    return segs, start


@pytest.mark.parametrize("head_dim,dtype,batch", [
    (32, torch.float16, 3), (32, torch.bfloat16, 1),
    (64, torch.float16, 1), (64, torch.bfloat16, 3),
    (128, torch.float16, 1), (128, torch.bfloat16, 1),
])
def test_ragged_lengths_fwd_bwd(backend, head_dim, dtype, batch):
    torch.manual_seed(head_dim + batch)
    segs, n = _ragged_segments(RAGGED)
    heads = 2 if batch == 1 else 1  # same work either way: the emulation's cost is blocks x tiles
    q, k, v = (torch.randn(n, batch, heads, head_dim) for _ in range(3))
    _compare(backend, q, k, v, segs, dtype)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_layout_segments(backend, fused):
    torch.manual_seed(1)
    layout = PackedLayout(("spectrogram", "rgb"), (17, 40), 4)
    segs = layout.attn_segments(fused)
    n = layout.total_rows
    q, k, v = (torch.randn(n, 2, 3, 64) for _ in range(3))
    out, dq, dk, dv = _compare(backend, q, k, v, segs, torch.float16)
    if not fused:  # bottleneck rows are in no segment: zero output, zero gradients
        for m in range(layout.num_modalities):
            rows = layout.bottleneck_rows(m)
            for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                assert t[rows].abs().max() == 0, f"{name}: rows {rows} in no segment must be 0"


def test_cross_lengths_and_shared_keys(backend):
    # queries and keys of different lengths; the last two segments share keys (dK/dV accumulate in waves)
    torch.manual_seed(2)
    q = torch.randn(150, 2, 2, 64)
    k, v = torch.randn(120, 2, 2, 64), torch.randn(120, 2, 2, 64)
    segs = [(0, 7, 0, 97), (7, 90, 50, 120), (100, 150, 60, 61)]
    _compare(backend, q, k, v, segs, torch.bfloat16)


def test_non_contiguous_inputs(backend):
    torch.manual_seed(3)
    dev = _device(backend)
    qkv = torch.randn(70, 2, 3, 2, 32)  # [N, B, 3, H, D]: q, k, v are strided views
    segs = [(0, 30, 0, 30), (30, 70, 30, 70)]
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _compare(backend, q, k, v, segs, torch.float16)
    # head-dim stride != 1 and odd token stride: the op copies, the answer is unchanged
    qt = torch.randn(2, 32, 70, 2).permute(2, 3, 0, 1)  # [70, 2, 2, 32] with stride(-1) != 1
    seg_t = torch.tensor(segs, dtype=torch.int32)
    a = ops.mbt_attention(qt.half().to(dev), qt.half().to(dev), qt.half().to(dev), seg_t, backend=backend)
    b = ops.mbt_attention(qt.contiguous().half().to(dev), qt.contiguous().half().to(dev), qt.contiguous().half().to(dev),
                          seg_t, backend=backend)
    assert torch.equal(a, b)


def test_no_grad_and_determinism(backend):
    torch.manual_seed(4)
    dev = _device(backend)
    q, k, v = (torch.randn(40, 1, 2, 64, dtype=torch.float16, device=dev) for _ in range(3))
    segs = torch.tensor([(0, 40, 0, 40)], dtype=torch.int32)
    with torch.no_grad():
        a = ops.mbt_attention(q, k, v, segs, backend=backend)
    assert not a.requires_grad
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ops.mbt_attention(*leaves, segs, backend=backend).sum().backward()
        grads.append([t.grad for t in leaves])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1), "repeated backward runs must be bitwise identical"


def test_rejects_fp32_and_bad_head_dim(backend):
    dev = _device(backend)
    segs = torch.tensor([(0, 4, 0, 4)], dtype=torch.int32)
    x = torch.randn(4, 1, 1, 64, device=dev)
    with pytest.raises(TypeError, match="float16 or bfloat16, got torch.float32"):
        ops.mbt_attention(x, x, x, segs, backend=backend)
    y = torch.randn(4, 1, 1, 80, device=dev, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dims .* got 80"):
        ops.mbt_attention(y, y, y, segs, backend=backend)


def test_rejects_more_than_65535_batch_heads_forward_and_backward(backend):
    from mbt_fast import cuda_ext

    lib = cuda_ext.build(emulated=backend == "cuda-emu")
    x = torch.zeros(2, 65536, 1, 32, dtype=torch.float16, device=_device(backend))
    seg = torch.tensor([(0, 2, 0, 2)], dtype=torch.int32)
    lse = torch.zeros(65536, 1, 2, device=x.device)
    with pytest.raises(RuntimeError, match="batch x heads must be at most 65535"):
        lib.attention_fwd(x, x, x, seg, 1.0, torch.empty(0, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="batch x heads must be at most 65535"):
        lib.attention_bwd(x, x, x, x, x, lse, seg, 1.0, torch.empty(0, dtype=torch.bool))


def test_rejects_an_empty_segment_table(backend):
    from mbt_fast import cuda_ext

    lib = cuda_ext.build(emulated=backend == "cuda-emu")
    x = torch.zeros(4, 1, 1, 32, dtype=torch.float16, device=_device(backend))
    with pytest.raises(RuntimeError, match="seg: expected at least one"):
        lib.attention_fwd(x, x, x, torch.zeros(0, 4, dtype=torch.int32), 1.0, torch.empty(0, dtype=torch.bool))


@pytest.mark.slow
def test_mbt_b_token_counts(backend):
    # the real packed fusion layer: spectrogram 401 + 4 bottlenecks, rgb 3137 + 4 (H=1, B=1 to keep the emulation bearable)
    torch.manual_seed(5)
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 4)
    n = layout.total_rows
    q, k, v = (torch.randn(n, 1, 1, 64) for _ in range(3))
    _compare(backend, q, k, v, layout.attn_segments(True), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_key_mask(backend, dtype):
    """Padding keys (key_mask False) get no weight and zero dK/dV; with 64-key tiles the first segment's
    first tile is all padding (a row's running max starts at -inf) and so is a tile inside the second."""
    segs = [(0, 150, 0, 150), (150, 240, 150, 240)]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(240, 3, 2, 64, generator=g) for _ in range(3))
    mask = torch.rand(3, 240, generator=g) > 0.3
    mask[:, :70] = False
    mask[:, 160:230] = False
    mask[:, [149, 239]] = True  # every query row keeps a key
    _, _, dk, dv = _compare(backend, q, k, v, segs, dtype, key_mask=mask)
    assert (dk[~mask.T] == 0).all() and (dv[~mask.T] == 0).all()


# The forward's tile edges: 128-row query tiles (64 at D=128), 64-key tiles, and a bound test on a segment's
# last key tile only when it is partial. (segments, Nq, Nk) per case.
TILE_EDGES = {
    # one query tile with warps past the segment, and a single partial key tile
    "shorter_than_a_tile": ([(0, 50, 0, 50)], 50, 50),
    # 2 full query tiles + 44 rows (4 + 44 at D=128); 4 full key tiles + a 44-key tail
    "full_tiles_and_tail": ([(0, 300, 0, 300)], 300, 300),
    # key tiles exactly full (no tail step): 256 and 128 keys; query tiles full (256 rows) and half (64)
    "key_tiles_exactly_full": ([(0, 256, 0, 256), (256, 320, 256, 384)], 320, 384),
}


@pytest.mark.parametrize("case", list(TILE_EDGES))
@pytest.mark.parametrize("head_dim,dtype", [(32, torch.float16), (64, torch.bfloat16), (128, torch.float16)])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_mask"])
def test_forward_tile_edges(backend, case, head_dim, dtype, masked):
    """Output (the DESIGN.md rule) and LSE (fp32 logsumexp of the same low-precision inputs) of the forward."""
    from mbt_fast import cuda_ext

    segs, nq, nk = TILE_EDGES[case]
    g = torch.Generator().manual_seed(head_dim + nq)
    q = torch.randn(nq, 1, 2, head_dim, generator=g)
    k, v = torch.randn(nk, 1, 2, head_dim, generator=g), torch.randn(nk, 1, 2, head_dim, generator=g)
    mask = None
    if masked:
        mask = torch.rand(1, nk, generator=g) > 0.4
        for _, _, k0, k1 in segs:
            mask[:, k1 - 1] = True  # every query row keeps a key
    _compare(backend, q, k, v, segs, dtype, backward=False, key_mask=mask)

    dev = _device(backend)
    lib = cuda_ext.build(emulated=backend == "cuda-emu")
    scale = 1.0 / math.sqrt(head_dim)
    low = [t.to(dtype) for t in (q, k, v)]
    km = torch.empty(0, dtype=torch.bool) if mask is None else mask
    _, lse = lib.attention_fwd(*[t.to(dev) for t in low], torch.tensor(segs, dtype=torch.int32), scale, km.to(dev))
    for q0, q1, k0, k1 in segs:
        s = torch.einsum("nbhd,mbhd->bhnm", low[0][q0:q1].float(), low[1][k0:k1].float()) * scale
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, k0:k1], -math.inf)
        err = (lse[:, :, q0:q1].cpu() - torch.logsumexp(s, -1)).abs().max().item()
        assert err < 1e-3, f"lse of rows [{q0}, {q1}): max error {err:.3e}"


@pytest.mark.parametrize("case", list(TILE_EDGES))
@pytest.mark.parametrize("head_dim,dtype", [(32, torch.float16), (64, torch.bfloat16), (128, torch.float16)])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_mask"])
def test_backward_tile_edges(backend, case, head_dim, dtype, masked):
    """dQ, dK, dV (the DESIGN.md rule) at the backward's tile edges: 64-row query tiles and 64-key tiles in
    the dQ kernel (a bound test on the last key tile only when it is partial), 64-key tiles and 64-query steps
    (32 at D=128) in the dK/dV kernel; a segment shorter than a tile leaves warps with no rows."""
    segs, nq, nk = TILE_EDGES[case]
    g = torch.Generator().manual_seed(3 * head_dim + nk)
    q = torch.randn(nq, 1, 2, head_dim, generator=g)
    k, v = torch.randn(nk, 1, 2, head_dim, generator=g), torch.randn(nk, 1, 2, head_dim, generator=g)
    dout = torch.randn(nq, 1, 2, head_dim, generator=g)
    mask = None
    if masked:
        mask = torch.rand(1, nk, generator=g) > 0.4
        for _, _, k0, k1 in segs:
            mask[:, k1 - 1] = True  # every query row keeps a key
    _, dq, dk, dv = _compare(backend, q, k, v, segs, dtype, dout=dout, key_mask=mask)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    if mask is not None:
        assert (dk[~mask[0]] == 0).all() and (dv[~mask[0]] == 0).all()


def test_backward_tail_tile_with_very_negative_scores(backend):
    """Keys past a segment's end sit in its last tile as zero rows (score 0); with every real score near -22
    the LSE is too, so without the tail tile's bound test their P = exp(0 - LSE) ~ 1e8 overflows fp16 in the
    dS operand of dQ += dS K and turns dQ into NaN (inf x 0) instead of adding nothing."""
    g = torch.Generator().manual_seed(11)
    q = -2.0 + 0.1 * torch.randn(50, 1, 1, 32, generator=g)
    k = 2.0 + 0.1 * torch.randn(50, 1, 1, 32, generator=g)
    v = torch.randn(50, 1, 1, 32, generator=g)
    _, dq, _, _ = _compare(backend, q, k, v, [(0, 50, 0, 50)], torch.float16)
    assert torch.isfinite(dq).all()
