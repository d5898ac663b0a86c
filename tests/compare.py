"""The comparison rule of DESIGN.md section 6, shared by every kernel and model test."""
import torch

FLOORS = {  # (forward, backward)
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 5e-2),
    torch.bfloat16: (5e-2, 1e-1),
}


def assert_close_2x(out, ref_fp32, eager_lowp, dtype, backward=False, name="output"):
    """``max|out - ref| <= 2 * max|eager_lowp - ref| + floor[dtype]``, printing both errors."""
    floor = FLOORS[dtype][int(backward)]
    err = (out.double() - ref_fp32.double()).abs().max().item()
    base = (eager_lowp.double() - ref_fp32.double()).abs().max().item() if eager_lowp is not None else 0.0
    bound = 2 * base + floor
    assert err <= bound, f"{name}: max|out - ref| = {err:.3e} > bound {bound:.3e} (max|eager_lowp - ref| = {base:.3e}, floor {floor:g})"


def check(name, out, ref_fp32, eager_lowp, dtype, backward=False):
    """``assert_close_2x`` with the name first (the kernel tests' order)."""
    assert_close_2x(out, ref_fp32, eager_lowp, dtype, backward=backward, name=name)


def agree(name, out, other, rtol=1e-5):
    """Two fp32 implementations agree to rounding: catches small formula slips the floors would hide."""
    scale = max(1.0, other.abs().max().item())
    err = (out.double() - other.double()).abs().max().item()
    assert err <= rtol * scale, f"{name}: max|out - other| = {err:.3e} > {rtol:g} * {scale:.3g}"
