"""Triton bias_gelu under the CPU interpreter: forward, grad_x and grad_bias against the fp32 reference
(DESIGN.md section 6 rule) and against the torch backend."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at decoration

import pytest  # noqa: E402
import torch  # noqa: E402

from mbt_fast import ops, torch_ops  # noqa: E402
from mbt_fast.kernels.bias_gelu import bias_gelu, bias_gelu_ref  # noqa: E402
from mbt_fast.layout import PackedLayout  # noqa: E402
from compare import agree, check  # noqa: E402


def _inputs(N, B, F, M, dtype, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # a feature slice of a wider buffer, like a view into a fused projection
        x = (3 * torch.randn(N, B, F + 5, generator=g)).to(dtype)[..., 2:F + 2]
    else:
        x = (3 * torch.randn(N, B, F, generator=g)).to(dtype)  # wide range: both tails and the bend of GELU
    bias = torch.randn(M, F, generator=g).to(dtype)
    rw = torch.randint(0, M, (N,), generator=g, dtype=torch.int32)
    grad = torch.randn(N, B, F, generator=g).to(dtype)
    return x, bias, rw, grad


def _run(fn, x, bias, rw, grad):
    x, bias = (t.detach().requires_grad_(True) for t in (x, bias))
    out = fn(x, bias, rw)
    return (out, *torch.autograd.grad(out, (x, bias), grad))


def _compare(x, bias, rw, grad):
    out = _run(bias_gelu, x, bias, rw, grad)
    ref = _run(bias_gelu_ref, x.float(), bias.float(), rw, grad.float())
    eager = _run(torch_ops.bias_gelu, x, bias, rw, grad)
    assert [t.dtype for t in out] == [x.dtype, x.dtype, bias.dtype]
    for i, name in enumerate(("out", "grad_x", "grad_bias")):
        check(name, out[i], ref[i], eager[i], x.dtype, backward=i > 0)
        if x.dtype == torch.float32:
            agree(name, out[i], eager[i])


@pytest.mark.parametrize("N,B,F,M", [(1, 1, 5, 1), (7, 3, 37, 2), (97, 1, 300, 3), (406, 3, 24, 2), (6, 1, 3072, 8)])
def test_fp32_shapes(N, B, F, M):
    _compare(*_inputs(N, B, F, M, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_low_precision(dtype, B):
    _compare(*_inputs(97, B, 72, 2, dtype, seed=B))


def test_noncontiguous():
    x, bias, rw, grad = _inputs(23, 3, 40, 2, torch.float32, noncontig=True)
    assert not x.is_contiguous()
    _compare(x, bias, rw, grad)


def test_saturation():
    # large |x|: GELU is x or 0 and its slope 1 or 0, no inf/nan from the tanh
    x = torch.tensor([-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4]).view(7, 1, 1)
    out, gx, _ = _run(bias_gelu, x, torch.zeros(1, 1), torch.zeros(7, dtype=torch.int32), torch.ones_like(x))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, 60.0, 1e4]), atol=1e-6, rtol=0)
    torch.testing.assert_close(gx.flatten(), torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]), atol=1e-6, rtol=0)


def test_mbt_b_token_counts():
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    x, bias, _, grad = _inputs(layout.total_rows, 1, 16, 2, torch.float16)
    _compare(x, bias, layout.row_weight(), grad)


def test_deterministic_backward():
    args = _inputs(61, 3, 40, 3, torch.float32)
    first, second = _run(bias_gelu, *args), _run(bias_gelu, *args)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_through_ops_dispatch():
    x, bias, rw, _ = _inputs(9, 2, 24, 2, torch.float32)
    torch.testing.assert_close(ops.bias_gelu(x, bias, rw, backend="triton"), ops.bias_gelu(x, bias, rw, backend="torch"))


def test_bad_input():
    x, bias, rw, _ = _inputs(9, 2, 24, 2, torch.float32)
    with pytest.raises(ValueError, match=r"bias: expected \[M, 24\]"):
        bias_gelu(x, bias[:, :3], rw)
    with pytest.raises(ValueError, match=r"row_weight: expected int32 \[9\]"):
        bias_gelu(x, bias, rw[:4])


@pytest.mark.slow
def test_mbt_b_full_width():
    """MBT-B exactly: tokens (401, 3137) + 5 bottleneck rows each, MLP width 3072, fp16."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    x, bias, _, grad = _inputs(layout.total_rows, 1, 3072, 2, torch.float16)
    _compare(x, bias, layout.row_weight(), grad)
