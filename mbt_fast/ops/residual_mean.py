"""Residual add with per-sample stochastic depth and the fused bottleneck mean.

``residual_mean(x, y, keep, layout, bottleneck)``: ``x + keep[b, m] * y`` on the packed ``[N, B, C]``
buffer, ``m`` the modality of the row (``keep`` ``[B, M]``: per-sample stochastic-depth mask, no
rescale, no gradient; None keeps everything). The bottleneck slot rows then follow ``bottleneck``:
``"add"`` like any row, ``"keep"`` stay ``x`` exactly (unimodal layers), ``"mean"`` become the mean over
modalities of their updated slots, written to every slot (fusion layers).
"""
from __future__ import annotations

import torch

from mbt_fast import torch_ops
from mbt_fast.layout import PackedLayout
from mbt_fast.ops._contract import check_backend, check_tensor

BOTTLENECK_MODES = ("add", "keep", "mean")


def check_residual_mean(x, y, keep, layout, bottleneck: str) -> None:
    """The argument checks of ``residual_mean`` (and of ``residual_mean_layernorm``, which shares them)."""
    check_tensor("x", x, 3)
    check_tensor("y", y, 3, x)
    if not isinstance(layout, PackedLayout):
        raise TypeError(f"layout: expected a mbt_fast.layout.PackedLayout, got {type(layout).__name__}")
    if y.shape != x.shape:
        raise ValueError(f"y: expected the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if x.shape[0] != layout.total_rows:
        raise ValueError(f"x: expected {layout.total_rows} rows for {layout}, got {x.shape[0]}")
    if bottleneck not in BOTTLENECK_MODES:
        raise ValueError(f"bottleneck: expected one of {BOTTLENECK_MODES}, got {bottleneck!r}")
    if keep is not None:
        check_tensor("keep", keep, 2, x)
        if tuple(keep.shape) != (x.shape[1], layout.num_modalities):
            raise ValueError(f"keep: expected shape {(x.shape[1], layout.num_modalities)}, got {tuple(keep.shape)}")


def residual_mean(x, y, keep, layout: PackedLayout, bottleneck: str = "add", *, backend: str = "torch"):
    check_backend(backend)
    check_residual_mean(x, y, keep, layout, bottleneck)
    if backend == "torch" or x.shape[1] == 0:  # an empty batch has nothing to launch
        return torch_ops.residual_mean(x, y, keep, layout, bottleneck)
    if backend == "triton":
        from mbt_fast.kernels.residual_mean import residual_mean as kernel
        return kernel(x, y, keep, layout, bottleneck)
    from mbt_fast import cuda_ext
    return cuda_ext.residual_mean(x, y, keep, layout, bottleneck, emulated=backend == "cuda-emu")


# ---- fake kernels of the C++ ops (torch.ops.mbt_fast[_emu].residual_mean_*), for torch.compile ----

def _fake_residual_mean_fwd(x, y, keep, row_mod, slot_start, n_bottleneck, mode):
    return torch.empty_like(x)


def _fake_residual_mean_bwd(grad, keep, row_mod, slot_start, n_bottleneck, mode):
    return [torch.empty_like(grad), torch.empty_like(grad)]


CUDA_FAKES = {"residual_mean_fwd": _fake_residual_mean_fwd, "residual_mean_bwd": _fake_residual_mean_bwd}
