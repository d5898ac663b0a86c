"""Triton residual_mean under the CPU interpreter: forward and both gradients against the fp32 reference
(DESIGN.md section 6 rule) and against the torch backend."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels are built at decoration

import pytest  # noqa: E402
import torch  # noqa: E402

from mbt_fast import ops, torch_ops  # noqa: E402
from mbt_fast.kernels.residual_mean import residual_mean, residual_mean_ref  # noqa: E402
from mbt_fast.layout import PackedLayout  # noqa: E402
from compare import agree, check  # noqa: E402


LAYOUTS = [
    PackedLayout(("a",), (7,), 1),
    PackedLayout(("spectrogram", "rgb"), (5, 11), 4),
    PackedLayout(("a", "b", "c"), (97, 1, 30), 8),
    PackedLayout(("a", "b"), (13, 6), 0),
]


def _inputs(layout, B, C, dtype, y_dtype=None, keep=True, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = layout.total_rows
    if noncontig:  # [B, N, C] storage seen as [N, B, C], and y a channel slice of a wider tensor
        x = torch.randn(B, N, C, generator=g).to(dtype).transpose(0, 1)
        y = torch.randn(N, B, C + 3, generator=g).to(y_dtype or dtype)[..., 1:C + 1]
    else:
        x = torch.randn(N, B, C, generator=g).to(dtype)
        y = torch.randn(N, B, C, generator=g).to(y_dtype or dtype)
    k = (torch.rand(B, layout.num_modalities, generator=g) > 0.4).float() if keep else None
    grad = torch.randn(N, B, C, generator=g).to(dtype)
    return x, y, k, grad


def _run(fn, x, y, k, layout, mode, grad):
    x = x.detach().requires_grad_(True)
    y = y.detach().requires_grad_(True)
    out = fn(x, y, k, layout, mode)
    gx, gy = torch.autograd.grad(out, (x, y), grad)
    return out, gx, gy


def _compare(x, y, k, layout, mode, grad):
    out = _run(residual_mean, x, y, k, layout, mode, grad)
    ref = _run(residual_mean_ref, x.float(), y.float(), k, layout, mode, grad.float())
    eager = _run(torch_ops.residual_mean, x, y, k, layout, mode, grad)
    assert out[0].dtype == x.dtype and out[1].dtype == x.dtype and out[2].dtype == y.dtype
    for i, name in enumerate(("out", "grad_x", "grad_y")):
        check(name, out[i], ref[i], eager[i], out[i].dtype, backward=i > 0)  # grad_y: y's dtype
        if out[i].dtype == torch.float32 and eager[i].dtype == torch.float32:
            agree(name, out[i], eager[i], rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"M{l.num_modalities}nb{l.n_bottleneck}")
@pytest.mark.parametrize("mode", ["add", "keep", "mean"])
@pytest.mark.parametrize("keep", [False, True], ids=["nokeep", "keep"])
def test_modes_fp32(layout, mode, keep):
    x, y, k, grad = _inputs(layout, 3, 37, torch.float32, keep=keep)
    _compare(x, y, k, layout, mode, grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["add", "keep", "mean"])
@pytest.mark.parametrize("B", [1, 3])
def test_low_precision(dtype, mode, B):
    layout = LAYOUTS[2]
    x, y, k, grad = _inputs(layout, B, 40, dtype, seed=B)
    _compare(x, y, k, layout, mode, grad)


@pytest.mark.parametrize("mode", ["keep", "mean"])
def test_noncontiguous_mixed_dtype(mode):
    # residual stream in fp32, branch output in bf16 (autocast-style); output fp32, grad_y bf16
    layout = LAYOUTS[1]
    x, y, k, grad = _inputs(layout, 3, 24, torch.float32, y_dtype=torch.bfloat16, noncontig=True)
    assert not x.is_contiguous() and not y.is_contiguous()
    _compare(x, y, k, layout, mode, grad)


def test_fractional_keep_and_eight_modalities():
    layout = PackedLayout(tuple("abcdefgh"), (3, 1, 4, 1, 5, 9, 2, 6), 2)
    x, y, _, grad = _inputs(layout, 2, 19, torch.float32)
    k = torch.rand(2, 8, generator=torch.Generator().manual_seed(3))
    _compare(x, y, k, layout, "mean", grad)


def test_mbt_b_token_counts():
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    x, y, k, grad = _inputs(layout, 1, 16, torch.float16)
    _compare(x, y, k, layout, "mean", grad)


def test_mean_semantics_exact():
    # every slot holds the same value, and grads split 1/M across modalities
    layout = PackedLayout(("a", "b", "c"), (4, 5, 6), 2)
    x, y, k, _ = _inputs(layout, 2, 8, torch.float32)
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = residual_mean(x, y, k, layout, "mean")
    slots = [layout.bottleneck_rows(m) for m in range(3)]
    assert torch.equal(out[slots[0]], out[slots[1]]) and torch.equal(out[slots[0]], out[slots[2]])
    grad = torch.zeros_like(out)
    grad[slots[1]] = 3.0
    gx, gy = torch.autograd.grad(out, (x, y), grad)
    for m, s in enumerate(slots):
        torch.testing.assert_close(gx[s], torch.ones_like(gx[s]))
        torch.testing.assert_close(gy[s], k[:, m].view(1, -1, 1).expand_as(gy[s]).contiguous())
    assert gx[layout.modality_rows(0)].abs().sum() == 0


def test_keep_mode_slots_are_x_exactly_even_for_inf_updates():
    """Unimodal layers leave the bottleneck rows untouched: x itself, not x + 0 * y (NaN for an inf y),
    as the torch backend and the reference do."""
    layout = LAYOUTS[1]
    x, y, k, _ = _inputs(layout, 2, 16, torch.float32)
    y[layout.bottleneck_rows(1)] = float("inf")
    out = residual_mean(x, y, k, layout, "keep")
    want = ops.residual_mean(x, y, k, layout, "keep", backend="torch")
    for m in range(layout.num_modalities):
        s = layout.bottleneck_rows(m)
        assert torch.equal(out[s], x[s]), f"slot of modality {m}: max |out - x| = {(out[s] - x[s]).abs().max()}"
    assert torch.equal(out, want)


def test_through_ops_dispatch():
    layout = LAYOUTS[1]
    x, y, k, _ = _inputs(layout, 2, 16, torch.float32)
    a = ops.residual_mean(x, y, k, layout, "mean", backend="triton")
    b = ops.residual_mean(x, y, k, layout, "mean", backend="torch")
    torch.testing.assert_close(a, b)


def test_bad_input():
    layout = LAYOUTS[1]
    x, y, k, _ = _inputs(layout, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="bottleneck: expected one of"):
        residual_mean(x, y, k, layout, "sum")
    with pytest.raises(ValueError, match=r"keep: expected shape \(2, 2\)"):
        residual_mean(x, y, k[:, :1], layout, "add")
    with pytest.raises(ValueError, match="x: expected 24 rows .* got 23"):
        residual_mean(x[:-1], y[:-1], k, layout, "add")


@pytest.mark.slow
def test_mbt_b_full_width():
    """MBT-B exactly: tokens (401, 3137), 5 bottleneck rows, C=768, batch 2, fp16, fusion-layer mean."""
    layout = PackedLayout(("spectrogram", "rgb"), (401, 3137), 5)
    x, y, k, grad = _inputs(layout, 2, 768, torch.float16)
    _compare(x, y, k, layout, "mean", grad)
