"""Triton segment_layernorm (plain and fused-residual) under the CPU interpreter: forward and every
gradient against the fp32 reference (DESIGN.md section 6 rule) and against the torch backend."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at decoration

import pytest  # noqa: E402
import torch  # noqa: E402

from mbt_fast import ops, torch_ops  # noqa: E402
from mbt_fast.kernels.segment_layernorm import segment_layernorm, segment_layernorm_ref  # noqa: E402
from mbt_fast.layout import PackedLayout  # noqa: E402
from compare import agree, check  # noqa: E402

EPS = 1e-6


def _inputs(N, B, C, M, dtype, wdtype=None, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        x = (torch.randn(B, N, C, generator=g) * 2 + 0.5).to(dtype).transpose(0, 1)
    else:
        x = (torch.randn(N, B, C, generator=g) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(M, C, generator=g)).to(wdtype or dtype)
    b = (0.5 * torch.randn(M, C, generator=g)).to(wdtype or dtype)
    rw = torch.randint(0, M, (N,), generator=g, dtype=torch.int32)
    grad = (torch.randn(N, B, C, generator=g) + 0.5).to(dtype)  # nonzero mean: exercises every LN-backward term
    return x, w, b, rw, grad


def _run(fn, x, w, b, rw, grad):
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
    out = fn(x, w, b, rw, EPS)
    return (out, *torch.autograd.grad(out, (x, w, b), grad))


def _compare(x, w, b, rw, grad):
    out = _run(segment_layernorm, x, w, b, rw, grad)
    ref = _run(segment_layernorm_ref, x.float(), w.float(), b.float(), rw, grad.float())
    eager = _run(torch_ops.segment_layernorm, x, w, b, rw, grad)
    assert [t.dtype for t in out] == [x.dtype, x.dtype, w.dtype, b.dtype]
    for i, name in enumerate(("out", "grad_x", "grad_weight", "grad_bias")):
        check(name, out[i], ref[i], eager[i], out[i].dtype, backward=i > 0)
        if x.dtype == torch.float32:
            agree(name, out[i], eager[i])


@pytest.mark.parametrize("N,B,C,M", [(1, 1, 7, 1), (7, 3, 37, 2), (97, 1, 64, 3), (406, 3, 33, 2), (5, 3, 768, 2)])
def test_fp32_shapes(N, B, C, M):
    _compare(*_inputs(N, B, C, M, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,B,C,M", [(7, 3, 37, 2), (97, 1, 96, 3)])
def test_low_precision(dtype, N, B, C, M):
    _compare(*_inputs(N, B, C, M, dtype, seed=N))


def test_wide_rows_eight_modalities():
    _compare(*_inputs(6, 1, 3072, 8, torch.float32))


def test_noncontiguous_fp32_weights_fp16_activations():
    x, w, b, rw, grad = _inputs(19, 3, 48, 2, torch.float16, wdtype=torch.float32, noncontig=True)
    assert not x.is_contiguous()
    out = _run(segment_layernorm, x, w, b, rw, grad)
    ref = _run(segment_layernorm_ref, x.float(), w, b, rw, grad.float())
    eager = _run(torch_ops.segment_layernorm, x, w, b, rw, grad)
    for i, (name, dt) in enumerate(zip(("out", "grad_x", "grad_weight", "grad_bias"), (torch.float16,) * 2 + (torch.float32,) * 2)):
        assert out[i].dtype == dt
        check(name, out[i], ref[i], eager[i], torch.float16, backward=i > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual(dtype):
    x, w, b, rw, grad = _inputs(29, 3, 40, 2, dtype)
    g = torch.Generator().manual_seed(7)
    res = torch.randn(x.shape, generator=g).to(dtype)
    grad_s = torch.randn(x.shape, generator=g).to(dtype)

    def run(fn, x, res, w, b):
        x, res, w, b = (t.detach().requires_grad_(True) for t in (x, res, w, b))
        y, s = fn(x, w, b, rw, EPS, residual=res)
        return (y, s, *torch.autograd.grad((y, s), (x, res, w, b), (grad, grad_s)))

    def eager_fn(x, w, b, rw, eps, residual):  # the unfused torch-backend computation
        s = x + residual
        return torch_ops.segment_layernorm(s, w, b, rw, eps), s

    out = run(segment_layernorm, x, res, w, b)
    ref = run(segment_layernorm_ref, x.float(), res.float(), w.float(), b.float())
    eager = run(eager_fn, x, res, w, b)
    for i, name in enumerate(("out", "s", "grad_x", "grad_residual", "grad_weight", "grad_bias")):
        check(name, out[i], ref[i], eager[i], dtype, backward=i > 1)
        if dtype == torch.float32:
            agree(name, out[i], eager[i])


def test_mbt_b_token_counts():
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    x, w, b, _, grad = _inputs(layout.total_rows, 1, 16, 2, torch.bfloat16)
    _compare(x, w, b, layout.row_weight(), grad)


def test_deterministic_backward():
    x, w, b, rw, grad = _inputs(61, 3, 40, 3, torch.float32)
    first = _run(segment_layernorm, x, w, b, rw, grad)
    second = _run(segment_layernorm, x, w, b, rw, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_through_ops_dispatch():
    x, w, b, rw, _ = _inputs(9, 2, 24, 2, torch.float32)
    torch.testing.assert_close(ops.segment_layernorm(x, w, b, rw, EPS, backend="triton"),
                               ops.segment_layernorm(x, w, b, rw, EPS, backend="torch"))


def test_bad_input():
    x, w, b, rw, _ = _inputs(9, 2, 24, 2, torch.float32)
    with pytest.raises(ValueError, match=r"row_weight: expected int32 \[9\]"):
        segment_layernorm(x, w, b, rw.long(), EPS)
    with pytest.raises(ValueError, match=r"weight, bias: expected two \[M, 24\] tensors"):
        segment_layernorm(x, w[:, :5], b, rw, EPS)
    with pytest.raises(ValueError, match=r"residual: expected the shape of x"):
        segment_layernorm(x, w, b, rw, EPS, residual=x[:1])


@pytest.mark.slow
def test_mbt_b_full_width():
    """MBT-B exactly: tokens (401, 3137) + 5 bottleneck rows each, C=768, bf16."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    x, w, b, _, grad = _inputs(layout.total_rows, 1, 768, 2, torch.bfloat16)
    _compare(x, w, b, layout.row_weight(), grad)
