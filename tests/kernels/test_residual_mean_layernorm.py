"""Triton residual_mean_layernorm under the CPU interpreter: both outputs and the gradients of x, y,
weight and bias against the fp32 reference (DESIGN.md section 6 rule, the two-op composition of the torch
backend as the low-precision baseline) and, in fp32, against that composition itself."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at decoration

import pytest  # noqa: E402
import torch  # noqa: E402

from mbt_fast import cuda_ext, ops, torch_ops  # noqa: E402
from mbt_fast.kernels.residual_mean_layernorm import residual_mean_layernorm, residual_mean_layernorm_ref  # noqa: E402
from mbt_fast.layout import PackedLayout  # noqa: E402
from compare import FLOORS, agree, check  # noqa: E402

EPS = 1e-6
LAYOUTS = [
    PackedLayout(("spectrogram", "rgb"), (5, 11), 4),
    PackedLayout(("a", "b", "c"), (97, 1, 30), 8),  # ragged: a one-token modality between two others
    PackedLayout(("a", "b"), (13, 6), 0),
]
NAMES = ("x_new", "h", "grad_x", "grad_y", "grad_weight", "grad_bias")


def _inputs(layout, B, C, dtype, keep=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, M = layout.total_rows, layout.num_modalities
    x = (torch.randn(N, B, C, generator=g) * 2 + 0.5).to(dtype)
    y = torch.randn(N, B, C, generator=g).to(dtype)
    k = (torch.rand(B, M, generator=g) > 0.4).float() if keep else None
    w = (1 + 0.5 * torch.randn(M, C, generator=g)).to(dtype)
    b = (0.5 * torch.randn(M, C, generator=g)).to(dtype)
    # nonzero-mean gradients of both outputs: every LayerNorm-backward term and the x_new path count
    grads = tuple((torch.randn(N, B, C, generator=g) + 0.5).to(dtype) for _ in range(2))
    return x, y, k, w, b, grads


def _composed(x, y, k, layout, mode, w, b, rw, eps):
    x_new = torch_ops.residual_mean(x, y, k, layout, mode)
    return x_new, torch_ops.segment_layernorm(x_new, w, b, rw, eps)


def _run(fn, x, y, k, layout, mode, w, b, grads):
    x, y, w, b = (t.detach().requires_grad_(True) for t in (x, y, w, b))
    x_new, h = fn(x, y, k, layout, mode, w, b, layout.row_weight(), EPS)
    return (x_new, h, *torch.autograd.grad((x_new, h), (x, y, w, b), grads))


def _compare(layout, mode, x, y, k, w, b, grads):
    out = _run(residual_mean_layernorm, x, y, k, layout, mode, w, b, grads)
    ref = _run(residual_mean_layernorm_ref, x.float(), y.float(), k, layout, mode, w.float(), b.float(),
               tuple(g.float() for g in grads))
    eager = _run(_composed, x, y, k, layout, mode, w, b, grads)
    assert [t.dtype for t in out] == [x.dtype] * 6
    for i, name in enumerate(NAMES):
        err = (out[i].double() - ref[i].double()).abs().max().item()
        base = (eager[i].double() - ref[i].double()).abs().max().item()
        print(f"{name}: max|fused - ref_fp32| = {err:.3e}, max|composed - ref_fp32| = {base:.3e}")
        check(name, out[i], ref[i], eager[i], x.dtype, backward=i > 1)
        if x.dtype == torch.float32:
            agree(name, out[i], eager[i])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"M{l.num_modalities}nb{l.n_bottleneck}")
@pytest.mark.parametrize("mode", ["add", "keep", "mean"])
@pytest.mark.parametrize("keep", [False, True], ids=["nokeep", "keep"])
def test_modes_fp32(layout, mode, keep):
    _compare(layout, mode, *_inputs(layout, 3, 37, torch.float32, keep=keep))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["add", "keep", "mean"])
@pytest.mark.parametrize("B", [1, 3])
def test_low_precision(dtype, mode, B):
    layout = LAYOUTS[1]
    _compare(layout, mode, *_inputs(layout, B, 40, dtype, seed=B))


@pytest.mark.parametrize("mode", ["keep", "mean"])
def test_noncontiguous_mixed_dtype(mode):
    """Autocast-style: an fp32 residual stream seen through a transpose, the branch output a bf16 channel
    slice; x_new, h and grad_x in fp32, grad_y in bf16."""
    layout = LAYOUTS[0]
    x, _, k, w, b, grads = _inputs(layout, 3, 24, torch.float32)
    N = layout.total_rows
    g = torch.Generator().manual_seed(5)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    y = torch.randn(N, 3, 27, generator=g).to(torch.bfloat16)[..., 2:26]
    assert not x.is_contiguous() and not y.is_contiguous()
    out = _run(residual_mean_layernorm, x, y, k, layout, mode, w, b, grads)
    ref = _run(residual_mean_layernorm_ref, x, y.float(), k, layout, mode, w, b, grads)
    eager = _run(_composed, x, y, k, layout, mode, w, b, grads)
    assert [t.dtype for t in out] == [torch.float32] * 3 + [torch.bfloat16] + [torch.float32] * 2
    for i, name in enumerate(NAMES):
        check(name, out[i], ref[i], eager[i], out[i].dtype, backward=i > 1)


def test_mbt_b_token_counts():
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    _compare(layout, "mean", *_inputs(layout, 1, 16, torch.float16))


def test_mean_slots_are_one_row_and_split_the_gradient():
    """Every slot's x_new is the same row, its LayerNorm differs only by the modality's weights; a gradient
    on one modality's slot (through h) reaches every modality's slot inputs, 1/M each."""
    layout = PackedLayout(("a", "b", "c"), (4, 5, 6), 2)
    x, y, k, w, b, _ = _inputs(layout, 2, 8, torch.float32)
    x.requires_grad_(True)
    y.requires_grad_(True)
    x_new, h = residual_mean_layernorm(x, y, k, layout, "mean", w, b, layout.row_weight(), EPS)
    slots = [layout.bottleneck_rows(m) for m in range(3)]
    assert all(torch.equal(x_new[slots[0]], x_new[s]) for s in slots[1:])
    xhat = torch.nn.functional.layer_norm(x_new[slots[0]], (8,), eps=EPS)
    for m, s in enumerate(slots):
        torch.testing.assert_close(h[s], xhat * w[m] + b[m])
    grad = torch.zeros_like(h)
    grad[slots[1]] = torch.randn(2, 2, 8)
    gx, gy = torch.autograd.grad(h, (x, y), grad)
    for m, s in enumerate(slots):
        torch.testing.assert_close(gx[s], gx[slots[0]])
        torch.testing.assert_close(gy[s], k[:, m].view(1, -1, 1) * gx[s])
    assert gx[slots[0]].abs().sum() > 0 and gx[layout.modality_rows(0)].abs().sum() == 0


def test_keep_slots_are_x_exactly_even_for_inf_updates():
    """In "keep" mode the slot rows are x itself, not x + 0 * y (NaN for an inf y), and so is their
    LayerNorm's input: as the composition of the two ops gives it."""
    layout = LAYOUTS[0]
    x, y, k, w, b, _ = _inputs(layout, 2, 16, torch.float32)
    y[layout.bottleneck_rows(1)] = float("inf")
    x_new, h = residual_mean_layernorm(x, y, k, layout, "keep", w, b, layout.row_weight(), EPS)
    want_x, want_h = _composed(x, y, k, layout, "keep", w, b, layout.row_weight(), EPS)
    s = layout.bottleneck_rows(1)
    assert torch.equal(x_new[s], x[s]), f"max |x_new - x| on the slot rows = {(x_new[s] - x[s]).abs().max()}"
    assert torch.isfinite(h).all(), "h has non-finite values"
    assert torch.equal(x_new, want_x)
    torch.testing.assert_close(h, want_h)


@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda-emu", marks=pytest.mark.skipif(
    bool(cuda_ext.build_problems(emulated=True)), reason="; ".join(cuda_ext.build_problems(emulated=True)) or "ok"))])
def test_through_ops_is_the_two_ops(backend):
    """``ops.residual_mean_layernorm`` gives what ``ops.residual_mean`` then ``ops.segment_layernorm`` give
    on the same backend, outputs and gradients (the cuda backends run exactly those two kernels)."""
    layout = LAYOUTS[0]
    dtype = torch.bfloat16 if backend == "cuda-emu" else torch.float32
    x, y, k, w, b, grads = _inputs(layout, 2, 16, dtype)
    rw, seg = layout.row_weight(), layout.row_segments()

    def fused(x, y, k, layout, mode, w, b, rw, eps):
        return ops.residual_mean_layernorm(x, y, k, layout, mode, w, b, rw, eps, segments=seg, backend=backend)

    def two_ops(x, y, k, layout, mode, w, b, rw, eps):
        x_new = ops.residual_mean(x, y, k, layout, mode, backend=backend)
        return x_new, ops.segment_layernorm(x_new, w, b, rw, eps, segments=seg, backend=backend)

    a = _run(fused, x, y, k, layout, "mean", w, b, grads)
    c = _run(two_ops, x, y, k, layout, "mean", w, b, grads)
    tol = 1e-5 if dtype == torch.float32 else FLOORS[dtype][1]
    for name, u, v in zip(NAMES, a, c):
        err = (u.double() - v.double()).abs().max().item()
        assert err <= tol * max(1.0, v.abs().max().item()), f"{backend} {name}: max|fused - two ops| = {err:.3e}"


def test_empty_batch():
    layout = LAYOUTS[0]
    x, y, _, w, b, _ = _inputs(layout, 0, 16, torch.float32)
    x_new, h = ops.residual_mean_layernorm(x, y, None, layout, "mean", w, b, layout.row_weight(), backend="triton")
    assert x_new.shape == h.shape == x.shape


def test_bad_input():
    layout = LAYOUTS[0]
    x, y, k, w, b, _ = _inputs(layout, 2, 16, torch.float32)
    rw = layout.row_weight()
    with pytest.raises(ValueError, match="bottleneck: expected one of"):
        residual_mean_layernorm(x, y, k, layout, "sum", w, b, rw)
    with pytest.raises(ValueError, match=r"keep: expected shape \(2, 2\)"):
        residual_mean_layernorm(x, y, k[:, :1], layout, "add", w, b, rw)
    with pytest.raises(ValueError, match=r"weight, bias: expected two \[M, 16\] tensors"):
        residual_mean_layernorm(x, y, k, layout, "add", w[:, :8], b, rw)
    with pytest.raises(ValueError, match=r"row_weight: expected int32 \[24\]"):
        residual_mean_layernorm(x, y, k, layout, "add", w, b, rw.long())


@pytest.mark.slow
def test_mbt_b_full_width():
    """MBT-B exactly: tokens (401, 3137), 5 bottleneck rows, C=768, batch 2, bf16, fusion-layer mean."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    _compare(layout, "mean", *_inputs(layout, 2, 768, torch.bfloat16))
