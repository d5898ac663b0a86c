"""The CUDA bias + tanh-GELU kernels (csrc/bias_gelu), forward and both gradients, against the fp32
reference of the Triton module (DESIGN.md section 6 rule, eager torch_ops in the low precision as the
baseline) and against mbt_fast.torch_ops in fp32; run emulated on the CPU (and on a GPU when visible)."""
import pytest
import torch

from compare import agree, assert_close_2x
from mbt_fast import cuda_ext, ops, torch_ops
from mbt_fast.kernels.bias_gelu import bias_gelu_ref

NAMES = ("out", "grad_x", "grad_bias")


def _device(backend):
    return "cpu" if backend == "cuda-emu" else "cuda"


def _inputs(N, B, F, M, dtype, bdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(N, B, F, generator=g)).to(dtype)  # both tails of the GELU and its saturation
    bias = torch.randn(M, F, generator=g).to(bdtype or dtype)
    rw = torch.randint(0, M, (N,), generator=g, dtype=torch.int32)
    if N >= 20 * M:  # contiguous segments as in the packed layout, plus a modality that comes back
        rw = torch.cat([torch.arange(M, dtype=torch.int32).repeat_interleave(N // M), torch.zeros(N % M, dtype=torch.int32)])
    grad = torch.randn(N, B, F, generator=g).to(dtype)
    return x, bias, rw, grad


def _run(fn, x, bias, rw, grad, device="cpu"):
    x, bias = (t.detach().to(device).requires_grad_(True) for t in (x, bias))
    out = fn(x, bias, rw.to(device))
    return [t.cpu() for t in (out, *torch.autograd.grad(out, (x, bias), grad.to(device)))]


def _compare(backend, x, bias, rw, grad):
    got = _run(lambda *a: ops.bias_gelu(*a, backend=backend), x, bias, rw, grad, _device(backend))
    ref = _run(bias_gelu_ref, x.float(), bias.float(), rw, grad.float())
    eager = _run(torch_ops.bias_gelu, x, bias, rw, grad)
    assert [t.dtype for t in got] == [x.dtype, x.dtype, bias.dtype]
    for i, name in enumerate(NAMES):
        assert_close_2x(got[i], ref[i], eager[i], x.dtype, backward=i > 0, name=name)
        if x.dtype == torch.float32:
            agree(name, got[i], eager[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,B,F,M", [(1, 1, 64, 1), (7, 3, 200, 2), (97, 1, 200, 2), (97, 3, 768, 3), (7, 3, 3072, 2)])
def test_bias_gelu(backend, N, B, F, M, dtype):
    _compare(backend, *_inputs(N, B, F, M, dtype, seed=N + F))


def test_fp32_bias_half_activations(backend):
    """An fp32 bias with bf16 rows: the kernel adds in fp32, the bias gradient comes back in fp32."""
    _compare(backend, *_inputs(19, 3, 1100, 3, torch.bfloat16, bdtype=torch.float32))


def test_noncontiguous_no_grad_and_deterministic(backend):
    x, bias, rw, grad = _inputs(23, 3, 300, 3, torch.float16)
    dev = _device(backend)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1).to(dev)
    assert not xt.is_contiguous()
    run = lambda: _run(lambda *a: ops.bias_gelu(*a, backend=backend), x, bias, rw, grad, dev)  # noqa: E731
    first, second = run(), run()
    with torch.no_grad():
        out = ops.bias_gelu(xt, bias.to(dev), rw, backend=backend)
    assert torch.equal(out.cpu(), first[0])
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_bad_input(backend):
    dev = _device(backend)
    emulated = backend == "cuda-emu"
    rw = torch.zeros(3, dtype=torch.int32, device=dev)
    with pytest.raises(TypeError, match="x: .*float64"):
        cuda_ext.bias_gelu(torch.randn(3, 1, 8, dtype=torch.float64, device=dev), torch.zeros(1, 8, device=dev), rw,
                           emulated=emulated)
    other = "meta" if emulated else "cpu"  # a device this build does not run on
    with pytest.raises(ValueError, match=f"bias: the {backend} backend needs"):
        cuda_ext.bias_gelu(torch.randn(3, 1, 8, device=dev), torch.zeros(1, 8, device=other), rw, emulated=emulated)
