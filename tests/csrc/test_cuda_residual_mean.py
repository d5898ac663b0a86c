"""The CUDA residual + bottleneck mean kernels (csrc/residual_mean) vs mbt_fast.torch_ops.residual_mean
(fp32 reference, eager in the low precision), forward and backward, every bottleneck mode."""
import pytest
import torch

from mbt_fast import ops, torch_ops
from mbt_fast.layout import PackedLayout
from compare import check


def _run(fn, x, y, keep, g, device):
    x, y = (t.to(device).detach().requires_grad_() for t in (x, y))
    out = fn(x, y, None if keep is None else keep.to(device))
    out.backward(g.to(device=device, dtype=out.dtype))
    return [t.detach().float().cpu() for t in (out, x.grad, y.grad)]


@pytest.mark.parametrize("mode", ["add", "keep", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_keep", [True, False])
def test_residual_mean_modes(backend, mode, dtype, with_keep):
    torch.manual_seed(0)
    layout = PackedLayout(("spectrogram", "rgb", "text"), (5, 9, 3), 2)
    n, batch, c = layout.total_rows, 3, 40
    x, y, g = (torch.randn(n, batch, c) for _ in range(3))
    keep = (torch.rand(batch, layout.num_modalities) > 0.4).float() if with_keep else None
    dev = "cpu" if backend == "cuda-emu" else "cuda"

    def torch_fn(a, b, k):
        return torch_ops.residual_mean(a, b, k, layout, mode)

    ref = _run(torch_fn, x, y, keep, g, "cpu")
    eager = _run(torch_fn, x.to(dtype), y.to(dtype), keep, g, "cpu")
    got = _run(lambda a, b, k: ops.residual_mean(a.to(dtype), b.to(dtype), k, layout, mode, backend=backend),
               x, y, keep, g, dev)
    for name, o, r, e, bwd in zip(("out", "dx", "dy"), got, ref, eager, (False, True, True)):
        check(name, o, r, e, dtype, bwd)
    if mode == "mean":  # every modality's slot holds the same mean
        slots = [got[0][layout.bottleneck_rows(m)] for m in range(layout.num_modalities)]
        assert all(torch.equal(slots[0], s) for s in slots[1:])
