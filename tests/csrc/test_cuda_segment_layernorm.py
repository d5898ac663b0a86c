"""The CUDA segment LayerNorm kernels (csrc/segment_layernorm), forward and every gradient, against the
fp32 reference of the Triton module (DESIGN.md section 6 rule, eager torch_ops in the low precision as the
baseline) and against mbt_fast.torch_ops in fp32; run emulated on the CPU (and on a GPU when visible)."""
import pytest
import torch

from compare import agree, assert_close_2x
from mbt_fast import cuda_ext, ops, torch_ops
from mbt_fast.kernels.segment_layernorm import segment_layernorm_ref

EPS = 1e-6
NAMES = ("out", "grad_x", "grad_weight", "grad_bias")


def _device(backend):
    return "cpu" if backend == "cuda-emu" else "cuda"


def _inputs(N, B, C, M, dtype, wdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, B, C, generator=g) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(M, C, generator=g)).to(wdtype or dtype)
    b = (0.5 * torch.randn(M, C, generator=g)).to(wdtype or dtype)
    rw = torch.randint(0, M, (N,), generator=g, dtype=torch.int32)
    if N >= 20 * M:  # contiguous segments as in the packed layout, plus a modality that comes back
        rw = torch.cat([torch.arange(M, dtype=torch.int32).repeat_interleave(N // M), torch.zeros(N % M, dtype=torch.int32)])
    grad = (torch.randn(N, B, C, generator=g) + 0.5).to(dtype)  # nonzero mean: every LN-backward term counts
    return x, w, b, rw, grad


def _run(fn, x, w, b, rw, grad, device="cpu"):
    x, w, b = (t.detach().to(device).requires_grad_(True) for t in (x, w, b))
    out = fn(x, w, b, rw.to(device), EPS)
    return [t.cpu() for t in (out, *torch.autograd.grad(out, (x, w, b), grad.to(device)))]


def _compare(backend, x, w, b, rw, grad):
    got = _run(lambda *a: ops.segment_layernorm(*a, backend=backend), x, w, b, rw, grad, _device(backend))
    ref = _run(segment_layernorm_ref, x.float(), w.float(), b.float(), rw, grad.float())
    eager = _run(torch_ops.segment_layernorm, x, w, b, rw, grad)
    assert [t.dtype for t in got] == [x.dtype, x.dtype, w.dtype, b.dtype]
    for i, name in enumerate(NAMES):
        assert_close_2x(got[i], ref[i], eager[i], x.dtype, backward=i > 0, name=name)
        if x.dtype == torch.float32:
            agree(name, got[i], eager[i])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,B,C,M", [(1, 1, 64, 1), (7, 3, 200, 2), (97, 1, 200, 2), (97, 3, 768, 3)])
def test_segment_layernorm(backend, N, B, C, M, dtype):
    _compare(backend, *_inputs(N, B, C, M, dtype, seed=N + C))


def test_fp32_weights_half_activations(backend):
    """The autocast case: fp32 LayerNorm weights, fp16 rows; gradients come back in each input's dtype."""
    _compare(backend, *_inputs(19, 3, 96, 2, torch.float16, wdtype=torch.float32))


def test_wide_rows(backend):
    """C = 3072 (MLP width of MBT-B): 384 threads, every register slot of a thread in use."""
    _compare(backend, *_inputs(3, 2, 3072, 2, torch.float32))


def test_noncontiguous_no_grad_and_deterministic(backend):
    x, w, b, rw, grad = _inputs(23, 3, 136, 3, torch.bfloat16)
    dev = _device(backend)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1).to(dev)  # same values, [N, B, C] view of a [B, N, C] buffer
    assert not xt.is_contiguous()
    with torch.no_grad():
        out = ops.segment_layernorm(xt, w.to(dev), b.to(dev), rw, EPS, backend=backend)
    torch.testing.assert_close(out.cpu(), _run(lambda *a: ops.segment_layernorm(*a, backend=backend), x, w, b, rw, grad, dev)[0],
                               rtol=0, atol=0)
    first = _run(lambda *a: ops.segment_layernorm(*a, backend=backend), x, w, b, rw, grad, dev)
    second = _run(lambda *a: ops.segment_layernorm(*a, backend=backend), x, w, b, rw, grad, dev)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_bad_input(backend):
    dev = _device(backend)
    emulated = backend == "cuda-emu"
    rw = torch.zeros(3, dtype=torch.int32, device=dev)
    w = torch.ones(1, 8, device=dev)
    with pytest.raises(TypeError, match="x: .*float64"):
        cuda_ext.segment_layernorm(torch.randn(3, 1, 8, dtype=torch.float64, device=dev), w, w, rw, EPS, emulated=emulated)
    wide = cuda_ext.LAYERNORM_MAX_C + 1
    with pytest.raises(ValueError, match=f"at most {cuda_ext.LAYERNORM_MAX_C} channels, got {wide}"):
        cuda_ext.segment_layernorm(torch.randn(3, 1, wide, device=dev), torch.ones(1, wide, device=dev),
                                   torch.ones(1, wide, device=dev), rw, EPS, emulated=emulated)
    other = "meta" if emulated else "cpu"  # a device this build does not run on
    with pytest.raises(ValueError, match=f"x: the {backend} backend needs"):
        cuda_ext.segment_layernorm(torch.randn(3, 1, 8, device=other), w, w, rw, EPS, emulated=emulated)
