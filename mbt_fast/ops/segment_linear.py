"""Per-segment Linear on the packed buffer: every row segment through its own weight, in one GEMM
launch where the GPU has a grouped GEMM, else one GEMM per segment written in place.

``segment_linear(x, weights, biases, segments)``: x ``[N, B, K]``; ``segments`` is a tuple of
``(start, end, weight_index)`` int rows covering ``[0, N)`` exactly once; ``out[s:e] = x[s:e] @ W_m.T
+ b_m``. Consecutive segments naming the same weight are merged (a shared encoder runs one GEMM).
Under autocast the GEMMs run in the autocast dtype, like ``nn.Linear``.

Two paths, one contract (``gemm_path`` picks; they differ by GEMM rounding only):

* ``per_segment``: one cuBLAS ``addmm`` per segment (bias in the GEMM's epilogue), backward one GEMM
  per segment for dX and for dW, one sum per segment for db;
* ``grouped``: one ``torch._grouped_mm`` over ``x.view(N * B, K)`` whose groups are the segments' row
  ranges (``offs`` = cumulative row ends, int32 on the device, built once per (segments, B, device)).
  ``_grouped_mm`` takes no bias ("Bias not supported yet" in torch 2.14), so a bias costs one more
  pass over the output; backward: dX and dW one grouped GEMM each. It is one GEMM kernel (CUTLASS,
  after a one-block setup kernel) only on CUDA sm_90/sm_100 in bf16; elsewhere torch loops over the
  groups after copying ``offs`` to the host (a device sync), so ``auto`` takes it only there, and only
  without a bias: the bias pass (2 x rows x out x 2 bytes, ~90 us for MBT-B's qkv at batch 8 on an
  H100) costs more than the launches it could save (model estimate in ``mbt_fast.perf_model``). fc1 on
  the kernel backends is that case: its bias is added by the fused ``bias_gelu`` kernel.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mbt_fast.ops._contract import check_tensor, row_segments

# "auto" (gemm_path decides), "grouped" or "per_segment" (forced: tests, benchmarks)
GEMM_PATH = "auto"


def merge_segments(seg: tuple) -> tuple:
    """``seg`` in row order with consecutive rows naming the same weight merged into one."""
    out: list[tuple[int, int, int]] = []
    for s, e, m in sorted(seg):
        if out and out[-1][2] == m and out[-1][1] == s:
            out[-1] = (out[-1][0], e, m)
        else:
            out.append((s, e, m))
    return tuple(out)


def device_has_grouped_gemm(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` is one kernel on ``device``: CUDA compute capability 9.x or 10.x
    (torch's ``_grouped_mm_cuda`` fast path; ``mbt_fast.perf_model`` replaces this to model a GPU)."""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_properties(device).major in (9, 10)  # constant-folded by torch.compile


def gemm_path(x: torch.Tensor, weight: torch.Tensor, n_groups: int, has_bias: bool) -> str:
    """The one place that picks the path: ``grouped`` where ``_grouped_mm`` is a single bf16 kernel
    (rows 16-byte aligned) and saves launches without costing a bias pass; else ``per_segment``."""
    if GEMM_PATH != "auto":
        return GEMM_PATH
    aligned = weight.shape[0] % 8 == 0 and weight.shape[1] % 8 == 0  # bf16 row strides, multiples of 16 bytes
    if (not 2 <= n_groups < 1024 or has_bias or x.shape[1] == 0 or x.dtype != torch.bfloat16 or not aligned
            or not device_has_grouped_gemm(x.device)):
        return "per_segment"
    return "grouped"


@dataclass(frozen=True)
class GroupPlan:
    """Device tables of one (segments, B, device, dtype): built once, read by every call."""

    group_weight: tuple[int, ...]  # weight index of each group
    offs: torch.Tensor  # int32 [G]: cumulative row ends in x.view(N * B, K)
    row_weight: torch.Tensor  # int64 [N]: weight index of each token row (bias gather)
    weight_rows: torch.Tensor  # [M, N] in x's dtype, 1 where row n uses weight m (bias gradient)


def _build_plan(seg: tuple, batch: int, n_weights: int, device: torch.device, dtype) -> GroupPlan:
    # made on the device from G-long constants: under torch.compile (a plan not cached yet) these are
    # device ops of the graph, no host tensor and no host-to-device copy per call
    ends = torch.tensor([e for _, e, _ in seg], dtype=torch.int32, device=device)
    lengths = torch.tensor([e - s for s, e, _ in seg], dtype=torch.int64, device=device)
    row_weight = torch.repeat_interleave(torch.tensor([m for _, _, m in seg], device=device), lengths,
                                         output_size=seg[-1][1])
    onehot = torch.nn.functional.one_hot(row_weight, n_weights).t().to(dtype).contiguous()
    return GroupPlan(tuple(m for _, _, m in seg), ends * batch, row_weight, onehot)


# (segments, B, n_weights, device, dtype) -> GroupPlan; read by torch.compile as graph inputs once filled
_PLANS: dict[tuple, GroupPlan] = {}


def group_plan(seg: tuple, batch: int, n_weights: int, device: torch.device, dtype) -> GroupPlan:
    key = (seg, batch, n_weights, device, dtype)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(*key)
        if not torch.compiler.is_compiling():  # eager fills the cache; a trace builds in its graph
            if len(_PLANS) > 1024:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


class SegmentLinearFunction(torch.autograd.Function):
    """``out[s:e] = x[s:e] @ W_m.T + b_m`` per row segment, each GEMM writing straight into ``out``."""

    @staticmethod
    def forward(ctx, x, segments, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        N, B, _ = x.shape
        out = x.new_empty(N, B, weights[0].shape[0])
        x2, o2 = x.reshape(N * B, x.shape[-1]), out.view(N * B, out.shape[-1])  # explicit widths: B may be 0
        for s, e, m in segments:
            if biases:
                torch.addmm(biases[m], x2[s * B:e * B], weights[m].t(), out=o2[s * B:e * B])
            else:
                torch.mm(x2[s * B:e * B], weights[m].t(), out=o2[s * B:e * B])
        ctx.save_for_backward(x, *weights)
        ctx.segments, ctx.has_bias = segments, bool(biases)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        N, B, _ = x.shape
        g2, x2 = grad_out.reshape(N * B, grad_out.shape[-1]), x.reshape(N * B, x.shape[-1])
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        # each weight's gradient is its (first) segment's GEMM output: no zero fill, no extra add
        gw, gb = [None] * len(weights), [None] * len(weights)
        for s, e, m in ctx.segments:
            gs = g2[s * B:e * B]
            if grad_x is not None:
                torch.mm(gs, weights[m], out=grad_x.view(N * B, x.shape[-1])[s * B:e * B])
            w_part = gs.t() @ x2[s * B:e * B]
            gw[m] = w_part if gw[m] is None else gw[m] + w_part
            if ctx.has_bias:
                b_part = gs.sum(0)
                gb[m] = b_part if gb[m] is None else gb[m] + b_part
        gw = [torch.zeros_like(w) if g is None else g for g, w in zip(gw, weights)]  # a weight no row uses
        gb = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if g is None else g
              for g, w in zip(gb, weights)] if ctx.has_bias else []
        return (grad_x, None, None, *gw, *gb)


class GroupedLinearFunction(torch.autograd.Function):
    """The same op as one ``torch._grouped_mm`` over all row groups (forward, dX and dW). The parameters
    may be in another dtype than x (autocast): they are stacked in x's dtype, the stack being the cast,
    and their gradients are returned in their own dtype."""

    @staticmethod
    def forward(ctx, x, plan, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        N, B, K = x.shape
        O = weights[0].shape[0]
        w = torch.stack([weights[m] for m in plan.group_weight], out=x.new_empty(len(plan.group_weight), O, K))
        out = torch._grouped_mm(x.reshape(N * B, K), w.transpose(1, 2), plan.offs).view(N, B, O)
        if biases:  # _grouped_mm has no bias: one gather of the [N, O] bias rows, one broadcast add
            b = torch.stack(biases, out=x.new_empty(n_weights, O))
            out.add_(b.index_select(0, plan.row_weight).unsqueeze(1))
        ctx.save_for_backward(x, w)
        ctx.plan, ctx.n_weights, ctx.has_bias, ctx.param_dtype = plan, n_weights, bool(biases), weights[0].dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        plan = ctx.plan
        N, B, K = x.shape
        O = w.shape[1]
        g2, x2 = grad_out.reshape(N * B, O).contiguous(), x.reshape(N * B, K)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(g2, w, plan.offs).view(N, B, K)
        gw_groups = torch._grouped_mm(g2.t(), x2, plan.offs)  # [G, O, K]: group g's g.T @ x
        gw = [None] * ctx.n_weights
        for g, m in enumerate(plan.group_weight):
            gw[m] = gw_groups[g] if gw[m] is None else gw[m] + gw_groups[g]
        gw = [gw_groups.new_zeros(O, K) if g is None else g.to(ctx.param_dtype) for g in gw]
        gb = []
        if ctx.has_bias:  # per weight: the sum of its rows' gradients, one reduction and one small GEMM
            gb = list((plan.weight_rows @ grad_out.sum(1)).to(ctx.param_dtype).unbind(0))
        return (grad_x, None, None, *gw, *gb)


def _distinct(weights, biases, seg):
    """One entry per distinct (weight, bias) pair, segments remapped: a shared encoder passes the same
    parameters for every modality, and an autograd.Function may not take one tensor twice (torch.compile)."""
    keep, remap = [], []
    for i, w in enumerate(weights):
        j = next((j for j in keep if weights[j] is w and (not biases or biases[j] is biases[i])), None)
        if j is None:
            keep.append(i)
        remap.append(keep.index(j if j is not None else i))
    if len(keep) == len(weights):
        return weights, biases, seg
    return ([weights[i] for i in keep], [biases[i] for i in keep] if biases else [],
            tuple((s, e, remap[m]) for s, e, m in seg))


def autocast_dtype(device_type: str):
    """The autocast dtype the GEMMs run in on ``device_type``, or None outside autocast (meta: never;
    ``mbt_fast.perf_model`` replaces this to emulate autocast there)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def prepare(x, weights, biases, segments):
    """Checked arguments: ``(x, weights, biases, merged segments, context)``, x cast to the autocast dtype
    under autocast (the parameters are cast by the path that runs); the GEMMs run inside ``context``
    (autocast off: the casts are done)."""
    check_tensor("x", x, 3)
    weights, biases = list(weights), list(biases) if biases is not None else []
    if not weights:
        raise ValueError("weights: expected at least one [out, in] weight, got none")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, 2, x)
        if w.shape != weights[0].shape or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weights[{i}]: expected shape [out, {x.shape[-1]}] like weights[0] "
                             f"{tuple(weights[0].shape)}, got {tuple(w.shape)}")
    if biases and len(biases) != len(weights):
        raise ValueError(f"biases: expected {len(weights)} (one per weight) or None, got {len(biases)}")
    for i, b in enumerate(biases):
        check_tensor(f"biases[{i}]", b, 1, x)
        if b.shape != (weights[0].shape[0],):
            raise ValueError(f"biases[{i}]: expected shape ({weights[0].shape[0]},), got {tuple(b.shape)}")
    seg = row_segments(segments, x.shape[0], len(weights))
    weights, biases, seg = _distinct(weights, biases, seg)
    seg = merge_segments(seg)
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        x = x.to(dtype)
    elif any(t.dtype != x.dtype for t in weights + biases):
        raise TypeError(f"x: expected the dtype of the weights and biases, got x {x.dtype}, "
                        f"weights {[w.dtype for w in weights]}, biases {[b.dtype for b in biases]}")
    ctx = torch.autocast(device_type, enabled=False) if dtype is not None else contextlib.nullcontext()
    return x, weights, biases, seg, ctx


def gelu_epilogue(device_type: str, needs_grad: bool) -> bool:
    """Whether fc1 runs as ``torch._addmm_activation(b, x, W.T, use_gelu=True)``, the bias and GELU in the
    GEMM's epilogue (cuBLASLt GELU_BIAS), instead of a GEMM and a separate GELU pass.

    Only on CUDA: there the op is tanh-GELU, Scenic's (aten/src/ATen/native/cuda/Blas.cpp,
    addmm_out_cuda_impl: without the Lt epilogue it applies ``at::gelu_(result, "tanh")``); on the CPU
    it is erf-GELU (aten/src/ATen/native/LinearAlgebra.cpp, addmm_activation_out_cpu: ``at::gelu_(result)``).
    Only without autograd: the op has no derivative and no pre-activation output, so training would
    need the pre-activation recomputed, one more fc1 GEMM in the backward (MBT-B batch 8 on an H100:
    134 GFLOP, ~190 us at 70 % of peak), against the GELU pass it saves (read + write of [rows, mlp_dim]
    bf16, 349 MB, ~120 us at 85 % of 3.35 TB/s; model estimate). At inference it saves that pass."""
    return device_type == "cuda" and not needs_grad


def segment_linear_gelu(x, weights, biases, segments):
    """``gelu_tanh(segment_linear(x, weights, biases, segments))`` with the GELU in the GEMM epilogue: one
    ``_addmm_activation`` per segment writing into the output. CUDA and no autograd only (``gelu_epilogue``)."""
    x, weights, biases, seg, ctx = prepare(x, weights, biases, segments)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [x, *weights, *biases])
    if not gelu_epilogue(x.device.type, needs_grad) or len(biases) != len(weights):
        raise ValueError(f"segment_linear_gelu: the GELU epilogue is tanh-GELU on CUDA only, has no backward and "
                         f"takes a bias per weight; got device {x.device}, grad {needs_grad}, {len(biases)} biases")
    with ctx:
        weights, biases = [w.to(x.dtype) for w in weights], [b.to(x.dtype) for b in biases]
        return _addmm_gelu_segments(x, weights, biases, seg)


def _addmm_gelu_segments(x, weights, biases, seg):
    """One ``_addmm_activation(use_gelu=True)`` per segment into the output (the device's GELU: see above)."""
    N, B, K = x.shape
    out = x.new_empty(N, B, weights[0].shape[0])
    x2, o2 = x.reshape(N * B, K), out.view(N * B, out.shape[-1])
    for s, e, m in seg:
        torch._addmm_activation(biases[m], x2[s * B:e * B], weights[m].t(), use_gelu=True, out=o2[s * B:e * B])
    return out


def segment_linear(x, weights, biases, segments):
    x, weights, biases, seg, ctx = prepare(x, weights, biases, segments)
    path = gemm_path(x, weights[0], len(seg), bool(biases))
    with ctx:
        if path == "grouped":
            plan = group_plan(seg, x.shape[1], len(weights), x.device, x.dtype)
            return GroupedLinearFunction.apply(x, plan, len(weights), *weights, *biases)
        weights, biases = [w.to(x.dtype) for w in weights], [b.to(x.dtype) for b in biases]  # autocast's casts
        return SegmentLinearFunction.apply(x, seg, len(weights), *weights, *biases)
