"""Performance model of one MBT training step per backend (DESIGN.md section 7). **Model estimate.**

For one step (forward, backward, optimizer step) of a preset it counts FLOPs, HBM bytes read + written
and kernel launches, and turns them into a roofline time for A100 and H100 from ONE table of peaks
(``PEAKS``, ``LAUNCH_US``). Nothing here runs on a GPU and nothing is measured.

How the counts are made:

* the model runs **at its real shapes on the ``meta`` device** (no data, no arithmetic: a
  ``mbt_base_16x2`` step at batch 8 takes a few seconds on a CPU) with parameters and activations in
  ``dtype`` (bf16 by default: a pure-bf16 step; the fp32 master-weight casts and fp32 LayerNorm
  outputs of ``torch.autocast`` are not modelled);
* a ``TorchDispatchMode`` sees every aten op executed (forward, autograd backward, optimizer) and
  costs it with ``aten_cost``: GEMM/conv FLOPs from shapes, bytes = every input + every output once
  (a broadcast input counts its distinct elements), one launch per op, views and allocations free;
* ops the meta device cannot run as on a GPU are replaced by declared per-op formulas, each op
  counted once per call (forward) and once per backward:
  - ``F.scaled_dot_product_attention`` (the ``torch`` backend): PyTorch's flash kernels
    (FlashAttention-2) — no N x N matrix in HBM (meta would run the math fallback instead);
  - the fused ops of ``mbt_fast.ops`` (``mbt_attention``, ``segment_layernorm``, ``bias_gelu``,
    ``residual_mean``) on the ``triton``/``cuda`` backends: one launch per fused kernel, bytes = its
    inputs and outputs once (``fused_cost``; partial-sum buffers and their reductions included);
* per kernel, ``time = max(tc_flops / tensor_peak + vec_flops / fp32_peak, bytes / bandwidth) + launch``.
  GEMMs and attention at 100 % of the tensor peak and every kernel at 100 % of the bandwidth are
  ideal: the estimates are lower bounds of each backend's time, and speedups are ratios of lower
  bounds. K/V re-reads of the attention kernels are assumed to hit L2 (counted once).

Backend differences this captures: ``reference`` = Scenic's concat/split/stack/mean copies and an
eager attention that writes and reads the N x N scores (and softmax) per modality; ``torch`` = the
packed layout with SDPA (flash, no N x N) but unfused LayerNorm/GELU/residual and the slice/scatter
copies of the per-segment attention; ``triton``/``cuda`` = the fused kernels. The ``cuda`` backend is
modelled with the Triton kernels' design (same contract and algorithm); it differs only where its
launcher is known to differ (the forward zero-fills the output and LSE: two memsets).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

LABEL = "model estimate"
BACKENDS = ("reference", "torch", "triton", "cuda")

# ---- the one table of peaks (vendors' dense figures, DESIGN.md section 7) -----------------------------
PEAKS = {
    "a100": {"name": "A100 SXM 80GB", "tensor_tflops": 312.0, "fp32_tflops": 19.5, "hbm_tbps": 2.04},
    "h100": {"name": "H100 SXM", "tensor_tflops": 989.0, "fp32_tflops": 67.0, "hbm_tbps": 3.35},
}
LAUNCH_US = 4.0  # per kernel launch (host overhead + kernel ramp), the same for every backend
SMS = 132  # H100 SXM SMs: sizes the partial-sum buffers of the fused backward kernels (A100: 108)
# FlashAttention-3 paper anchors (H100, fp16, head dim 64, forward, non-causal), TFLOP/s at 512/1k/2k tokens
ANCHORS_TFLOPS = {
    "FA2": (282.0, 306.0, 318.0), "Triton": (340.0, 382.0, 396.0),
    "cuDNN": (335.0, 373.0, 395.0), "FA3": (333.0, 392.0, 460.0),
}
ANCHOR_TOKENS = (512, 1024, 2048)


def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# ----------------------------------------------------------------------------------------------------
# cost records
# ----------------------------------------------------------------------------------------------------
@dataclass
class OpCost:
    """One kernel (or a group of identical kernels): what it computes and moves."""

    name: str
    cls: str  # op class: gemm, attention, softmax, layernorm, elementwise, reduction, copy, fill, optimizer, h2d
    tc_flops: float = 0.0  # tensor-core FLOPs (GEMM, conv, attention)
    vec_flops: float = 0.0  # CUDA-core FLOPs (elementwise, reductions), an estimate per element
    bytes: float = 0.0  # HBM bytes read + written
    launches: int = 1

    def time_s(self, gpu: str, fp32_gemm: bool = False) -> tuple[float, str]:
        """Roofline time and the term that dominates it: ``compute``, ``memory`` or ``launch``."""
        p = PEAKS[gpu]
        tc_peak = (p["fp32_tflops"] if fp32_gemm else p["tensor_tflops"]) * 1e12
        compute = self.tc_flops / tc_peak + self.vec_flops / (p["fp32_tflops"] * 1e12)
        memory = self.bytes / (p["hbm_tbps"] * 1e12)
        launch = self.launches * LAUNCH_US * 1e-6
        dominant = max((compute, "compute"), (memory, "memory"), (launch, "launch"))[1]
        return max(compute, memory) + launch, dominant


@dataclass
class Counter:
    ops: list = field(default_factory=list)

    def add(self, cost: OpCost):
        self.ops.append(cost)

    def totals(self) -> dict:
        return {"flops": sum(o.tc_flops + o.vec_flops for o in self.ops),
                "tc_flops": sum(o.tc_flops for o in self.ops),
                "hbm_bytes": sum(o.bytes for o in self.ops),
                "launches": sum(o.launches for o in self.ops)}

    def est_ms(self, gpu: str, fp32_gemm: bool = False) -> float:
        return 1e3 * sum(o.time_s(gpu, fp32_gemm)[0] for o in self.ops)

    def by_class(self, gpu: str, fp32_gemm: bool = False) -> dict:
        """Per op class: counts, time, and the dominant term (the one holding most of its time)."""
        out = defaultdict(lambda: {"flops": 0.0, "hbm_bytes": 0.0, "launches": 0, "ms": 0.0,
                                   "by_term": defaultdict(float)})
        for o in self.ops:
            t, dom = o.time_s(gpu, fp32_gemm)
            c = out[o.cls]
            c["flops"] += o.tc_flops + o.vec_flops
            c["hbm_bytes"] += o.bytes
            c["launches"] += o.launches
            c["ms"] += 1e3 * t
            c["by_term"][dom] += t
        for c in out.values():
            c["dominant"] = max(c.pop("by_term").items(), key=lambda kv: kv[1])[0]
        return dict(out)


# ----------------------------------------------------------------------------------------------------
# aten ops: FLOPs from shapes, bytes = inputs + outputs
# ----------------------------------------------------------------------------------------------------
_FREE = {  # allocation, metadata and aliasing ops: no kernel
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_unsafe_view", "view", "reshape", "_reshape_alias", "as_strided", "expand", "permute", "t", "transpose",
    "unsqueeze", "squeeze", "slice", "select", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "_local_scalar_dense", "is_same_size", "_has_compatible_shallow_copy_type", "set_", "resize_", "sym_size",
    "sym_stride", "sym_numel", "_record_function_enter_new", "_record_function_exit", "result_type",
    "unflatten", "flatten", "view_as", "expand_as", "contiguous_noop",
}
_VEC_PER_ELEM = {"gelu": 10, "gelu_backward": 14, "native_layer_norm": 8, "native_layer_norm_backward": 12,
                 "_softmax": 5, "_safe_softmax": 5, "_softmax_backward_data": 4, "_log_softmax": 5,
                 "_log_softmax_backward_data": 4, "tanh": 4, "exp": 2}
_CLASS = {"native_layer_norm": "layernorm", "native_layer_norm_backward": "layernorm",
          "_softmax": "softmax", "_safe_softmax": "softmax", "_softmax_backward_data": "softmax",
          "_log_softmax": "softmax", "_log_softmax_backward_data": "softmax",
          "cat": "copy", "stack": "copy", "clone": "copy", "copy_": "copy", "_to_copy": "copy",
          "slice_scatter": "copy", "slice_backward": "copy", "select_backward": "copy", "index": "copy",
          "zeros": "fill", "zeros_like": "fill", "new_zeros": "fill", "fill_": "fill", "zero_": "fill",
          "ones_like": "fill", "full": "fill", "new_full": "fill", "full_like": "fill", "ones": "fill",
          "sum": "reduction", "mean": "reduction", "nll_loss_forward": "reduction", "nll_loss_backward": "elementwise"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (a broadcast dimension, stride 0, is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _mm_flops(a_shape, b_shape) -> float:
    return 2.0 * math.prod(a_shape[:-1]) * a_shape[-1] * b_shape[-1]


def _conv_flops(x_shape, w_shape, out_shape, transposed: bool) -> float:
    # each output element of a (non-transposed) conv is a dot product of length C_in/groups * prod(kernel)
    per_out = math.prod(w_shape[1:])
    return 2.0 * math.prod(out_shape) * per_out if not transposed else 2.0 * math.prod(x_shape) * per_out


def _foreach_launches(tensors) -> int:
    """multi_tensor_apply: up to ~48 tensors and 320 chunks of 64K elements per launch (approximate)."""
    n = len(tensors)
    elems = sum(t.numel() for t in tensors)
    return max(1, math.ceil(n / 48), math.ceil(elems / (320 * 65536)))


def aten_cost(func, args, kwargs, out) -> OpCost | None:
    """Cost of one executed aten op on the modelled device; ``None`` when it is free (no kernel)."""
    name = func.overloadpacket.__name__
    kwargs = kwargs or {}
    outs = [t for t in _tensors(out)]
    if name in _FREE or func.is_view or not outs and not name.startswith("_foreach"):
        return None
    # only ops that produce device (meta) tensors: host-side index building is not GPU work
    if not any(t.device.type == "meta" for t in outs) and not name.startswith("_foreach"):
        return None
    ins = [t for t in _tensors(args)] + [t for k, v in kwargs.items() if k != "out" for t in _tensors(v)]
    if name == "_to_copy" and ins and ins[0].device.type != "meta":
        return OpCost("h2d_copy", "h2d", bytes=sum(tensor_bytes(t) for t in outs))
    if name.startswith("_foreach"):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        tensors = [t for lst in lists for t in lst]
        written = lists[0] if name.endswith("_") else outs
        nbytes = sum(tensor_bytes(t) for t in tensors) + sum(tensor_bytes(t) for t in written)
        return OpCost(name, "optimizer", vec_flops=sum(t.numel() for t in lists[0]), bytes=nbytes,
                      launches=_foreach_launches(lists[0]))
    if name == "copy_":  # read src, write dst
        return OpCost(name, "copy", bytes=tensor_bytes(args[1]) + tensor_bytes(args[0]))
    in_bytes = sum(tensor_bytes(t) for t in ins)
    out_bytes = sum(tensor_bytes(t) for t in outs)
    if name in ("zeros", "new_zeros", "zeros_like", "ones_like", "full", "new_full", "full_like", "ones",
                "fill_", "zero_", "scalar_tensor"):
        return OpCost(name, "fill", bytes=out_bytes)
    nbytes = in_bytes + out_bytes
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        extra = outs[0].numel() if name in ("addmm", "baddbmm") else 0
        return OpCost(name, "gemm", tc_flops=_mm_flops(a.shape, b.shape), vec_flops=extra, bytes=nbytes)
    if name == "convolution":
        x, w = args[0], args[1]
        return OpCost(name, "gemm", tc_flops=_conv_flops(x.shape, w.shape, outs[0].shape, bool(args[6])),
                      bytes=nbytes)
    if name == "convolution_backward":
        grad, x, w = args[0], args[1], args[2]
        mask = args[-1]
        fl = _conv_flops(x.shape, w.shape, grad.shape, bool(args[7]))
        return OpCost(name, "gemm", tc_flops=fl * (int(mask[0]) + int(mask[1])), vec_flops=grad.numel() * int(mask[2]),
                      bytes=nbytes)
    per = _VEC_PER_ELEM.get(name, 1)
    elems = max([t.numel() for t in outs] + [t.numel() for t in ins if t.dim() > 0] + [0])
    return OpCost(name, _CLASS.get(name, "elementwise"), vec_flops=per * elems, bytes=nbytes)


class AtenCounter(TorchDispatchMode):
    """Costs every aten op executed under it (meta tensors) into ``counter``."""

    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            cost = aten_cost(func, args, kwargs, out)
            if cost is not None:
                self.counter.add(cost)
        return out


# ----------------------------------------------------------------------------------------------------
# declared formulas of the fused kernels (and of PyTorch's flash SDPA)
# ----------------------------------------------------------------------------------------------------
def attention_flops(segments, batch: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs ``4 * B * H * nq * nk * D`` summed over segments (QK^T and PV, 2 FLOPs per MAC)."""
    return float(sum(4 * batch * heads * (qe - qs) * (ke - ks) * head_dim for qs, qe, ks, ke in segments))


def attention_cost(segments, batch: int, heads: int, head_dim: int, esize: int, direction: str,
                   impl: str = "triton") -> OpCost:
    """Flash-style attention over ``segments``; ``impl``: ``triton``, ``cuda`` or ``sdpa_flash``.

    Forward bytes: q rows, k/v rows (once: re-reads across query blocks hit L2), out, fp32 LSE.
    Backward (``impl`` triton/cuda: preprocess + dK/dV + dQ kernels) reads o, dO (preprocess), q, k, v,
    dO, LSE, delta twice (dK/dV and dQ kernels) and writes delta, dq, dk, dv; FLOPs 2.5x the forward.
    """
    bhd = batch * heads * head_dim
    nq = sum(qe - qs for qs, qe, _, _ in segments)
    nk = sum(ke - ks for _, _, ks, ke in segments)
    fl = attention_flops(segments, batch, heads, head_dim)
    lse = 4 * batch * heads * nq
    name = f"{impl}:mbt_attention_{direction}"
    if direction == "fwd":
        nbytes = (nq + 2 * nk) * bhd * esize + nq * bhd * esize + lse
        launches = 1
        if impl == "cuda":  # the launcher zero-fills out and lse first
            nbytes += nq * bhd * esize + lse
            launches += 2
        return OpCost(name, "attention", tc_flops=fl, vec_flops=0.0, bytes=nbytes, launches=launches)
    q_b, kv_b = nq * bhd * esize, 2 * nk * bhd * esize
    pre = 2 * q_b + lse  # read o, dO; write delta
    dkdv = 2 * q_b + kv_b + 2 * lse + kv_b  # read q, dO, k, v, lse, delta; write dk, dv
    dq = 2 * q_b + kv_b + 2 * lse + q_b  # read q, dO, k, v, lse, delta; write dq
    nbytes, launches = pre + dkdv + dq, 3
    if impl == "sdpa_flash":  # FA2 backward: fp32 dq accumulator zeroed, accumulated, converted
        acc = 4 * nq * bhd
        nbytes = pre + (2 * q_b + kv_b + 2 * lse + kv_b) + 3 * acc + q_b
        launches = 4
    return OpCost(name, "attention", tc_flops=2.5 * fl, bytes=nbytes, launches=launches)


def layernorm_cost(rows: int, C: int, M: int, esize: int, wsize: int, direction: str) -> OpCost:
    """segment_layernorm over ``rows = N * B`` rows of C channels with ``M`` weight sets."""
    x = rows * C * esize
    stats = 2 * rows * 4  # fp32 mean and rstd
    w = 2 * M * C * wsize
    rw = 4 * rows  # int32 row -> modality table (per token row; small)
    if direction == "fwd":
        return OpCost("fused:segment_layernorm_fwd", "layernorm", vec_flops=8 * rows * C,
                      bytes=x + w + rw + x + stats, launches=1)
    part = 2 * min(SMS * 4, rows) * M * C * 4  # fp32 partial dW, dB per program
    casts = 0 if wsize == 4 else 2
    nbytes = 2 * x + w // 2 + stats + rw + x  # read x, g, weight, stats; write gx
    nbytes += part + part + 2 * M * C * 4  # write partials, read them in the two sums, write dW, dB
    nbytes += casts * (M * C * 4 + M * C * wsize)
    return OpCost("fused:segment_layernorm_bwd", "layernorm", vec_flops=12 * rows * C, bytes=nbytes,
                  launches=3 + casts)


def bias_gelu_cost(rows: int, Fdim: int, M: int, esize: int, direction: str) -> OpCost:
    x = rows * Fdim * esize
    b = M * Fdim * esize
    if direction == "fwd":
        return OpCost("fused:bias_gelu_fwd", "elementwise", vec_flops=10 * rows * Fdim, bytes=2 * x + b + 4 * rows)
    col_blocks = math.ceil(Fdim / 256)
    programs = max(1, min(SMS * 4 // col_blocks, rows))
    part = programs * M * Fdim * 4
    casts = 0 if esize == 4 else 1
    nbytes = 3 * x + b + 4 * rows + 2 * part + M * Fdim * 4 + casts * (M * Fdim * (4 + esize))
    return OpCost("fused:bias_gelu_bwd", "elementwise", vec_flops=14 * rows * Fdim, bytes=nbytes,
                  launches=2 + casts)


def residual_mean_cost(rows: int, batch: int, C: int, M: int, n_bottleneck: int, mean: bool, has_keep: bool,
                       esize: int, direction: str) -> OpCost:
    x = rows * C * esize
    slots = M * n_bottleneck * batch * C * esize if mean else 0  # the mean re-reads every slot
    keep = 4 * batch * M if has_keep else 0
    if direction == "fwd":
        return OpCost("fused:residual_mean_fwd", "elementwise", vec_flops=2 * rows * C, bytes=3 * x + slots + keep)
    # reads g; writes gy, and gx only in "mean" mode (otherwise gx is g itself)
    return OpCost("fused:residual_mean_bwd", "elementwise", vec_flops=rows * C,
                  bytes=x + x + (x if mean else 0) + slots + keep)


class _DeclaredFunction(torch.autograd.Function):
    """Stands in for a kernel on meta: records its declared forward cost, returns an empty output of
    the right shape, and records the declared backward cost when autograd reaches it."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        spec["counter"].add(spec["fwd"])
        ctx.spec = spec
        ctx.metas = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in inputs]
        return torch.empty(spec["out_shape"], dtype=spec["out_dtype"], device="meta")

    @staticmethod
    def backward(ctx, grad):
        ctx.spec["counter"].add(ctx.spec["bwd"])
        grads = [torch.empty(m[0], dtype=m[1], device=m[2]) if m is not None and need else None
                 for m, need in zip(ctx.metas, ctx.needs_input_grad[1:])]
        return (None, *grads)


def _declared(counter, fwd, bwd, out_shape, out_dtype, *inputs):
    spec = {"counter": counter, "fwd": fwd, "bwd": bwd, "out_shape": tuple(out_shape), "out_dtype": out_dtype}
    return _DeclaredFunction.apply(spec, *inputs)


@contextlib.contextmanager
def declared_kernels(counter: Counter, impl: str):
    """Replace the fused ops of ``mbt_fast.ops`` (``impl`` triton/cuda) with their declared costs."""
    from mbt_fast import ops

    def mbt_attention(q, k, v, segments, *, scale=None, dropout_p=0.0, backend=None):
        seg = [tuple(int(x) for x in row) for row in torch.as_tensor(segments).reshape(-1, 4).tolist()]
        _, B, H, D = q.shape
        es = q.element_size()
        return _declared(counter, attention_cost(seg, B, H, D, es, "fwd", impl),
                         attention_cost(seg, B, H, D, es, "bwd", impl), q.shape, q.dtype, q, k, v)

    def segment_layernorm(x, weight, bias, row_weight, eps=1e-6, *, backend=None):
        N, B, C = x.shape
        es, ws, M = x.element_size(), weight.element_size(), weight.shape[0]
        return _declared(counter, layernorm_cost(N * B, C, M, es, ws, "fwd"), layernorm_cost(N * B, C, M, es, ws, "bwd"),
                         x.shape, x.dtype, x, weight, bias)

    def bias_gelu(x, bias, row_weight, *, backend=None):
        N, B, Fd = x.shape
        es, M = x.element_size(), bias.shape[0]
        return _declared(counter, bias_gelu_cost(N * B, Fd, M, es, "fwd"), bias_gelu_cost(N * B, Fd, M, es, "bwd"),
                         x.shape, x.dtype, x, bias)

    def residual_mean(x, y, keep, layout, bottleneck="add", *, backend=None):
        N, B, C = x.shape
        mean = bottleneck == "mean" and layout.n_bottleneck > 0
        args = (N * B, B, C, layout.num_modalities, layout.n_bottleneck, mean, keep is not None, x.element_size())
        return _declared(counter, residual_mean_cost(*args, "fwd"), residual_mean_cost(*args, "bwd"),
                         x.shape, x.dtype, x, y)

    with mock.patch.multiple(ops, mbt_attention=mbt_attention, segment_layernorm=segment_layernorm,
                             bias_gelu=bias_gelu, residual_mean=residual_mean):
        yield


@contextlib.contextmanager
def declared_sdpa(counter: Counter):
    """``F.scaled_dot_product_attention`` as PyTorch's flash kernels on a GPU (meta runs the math path)."""

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        B, H, nq, D = q.shape
        nk = k.shape[-2]
        seg = [(0, nq, 0, nk)]
        es = q.element_size()
        return _declared(counter, attention_cost(seg, B, H, D, es, "fwd", "sdpa_flash"),
                         attention_cost(seg, B, H, D, es, "bwd", "sdpa_flash"), q.shape, q.dtype, q, k, v)

    with mock.patch.object(F, "scaled_dot_product_attention", sdpa):
        yield


# ----------------------------------------------------------------------------------------------------
# one training step on meta
# ----------------------------------------------------------------------------------------------------
def _meta_model(cfg, dtype):
    from mbt_fast.model import MBT

    with torch.device("meta"):
        model = MBT(cfg, backend="torch")
    return model.to(dtype).train()


def _inputs(cfg, batch: int, dtype):
    out = {}
    if "rgb" in cfg.modality_fusion:
        out["rgb"] = torch.empty(batch, 3, *cfg.rgb_shape, dtype=dtype, device="meta")
    if "spectrogram" in cfg.modality_fusion:
        out["spectrogram"] = torch.empty(batch, *cfg.spectrogram_shape, dtype=dtype, device="meta")
    return out


_IS_AUTOCAST_ENABLED = torch.is_autocast_enabled


def _autocast_enabled(*args):
    return False if args and args[0] == "meta" else _IS_AUTOCAST_ENABLED(*args)


_AUTOCAST = torch.autocast


def _autocast(device_type, *args, **kwargs):
    return contextlib.nullcontext() if device_type == "meta" else _AUTOCAST(device_type, *args, **kwargs)


@contextlib.contextmanager
def counting(counter: Counter, backend: str):
    """Count everything run inside on meta tensors as ``backend`` would run it on a GPU."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("mbt_fast.model.resolved_backend", lambda b, device_type=None: b))
        # the meta device has no autocast state: ops.segment_linear queries and disables it
        stack.enter_context(mock.patch.object(torch, "is_autocast_enabled", _autocast_enabled))
        stack.enter_context(mock.patch.object(torch, "autocast", _autocast))
        if backend in ("triton", "cuda"):
            stack.enter_context(declared_kernels(counter, backend))
        stack.enter_context(declared_sdpa(counter))
        stack.enter_context(AtenCounter(counter))
        yield counter


def count_step(cfg, batch: int, backend: str, dtype=torch.bfloat16, momentum: float = 0.9) -> Counter:
    """Counts of one training step: forward, per-modality cross-entropy, backward, SGD (momentum) step."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    model = _meta_model(cfg, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=momentum, foreach=True)
    for p in params:  # momentum buffers exist after the first step; a steady-state step is counted
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    inputs = _inputs(cfg, batch, dtype)
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    counter = Counter()
    model.backend = backend  # set directly: the fast backends cannot be resolved for meta tensors
    with counting(counter, backend):
        logits = model.forward_per_modality(**inputs)
        loss = sum(F.cross_entropy(v, labels) for v in logits.values()) / len(logits)
        loss.backward()
        opt.step()
    return counter


# ----------------------------------------------------------------------------------------------------
# the fused kernels against their roofline
# ----------------------------------------------------------------------------------------------------
def anchor_tflops(tokens: float, provider: str = "Triton") -> float:
    """Anchor TFLOP/s at ``tokens`` (linear in log2(tokens) between the 512/1k/2k points, clamped)."""
    vals = ANCHORS_TFLOPS[provider]
    x = min(max(math.log2(max(tokens, 1)), 9.0), 11.0)
    i = min(int(x) - 9, 1)
    return vals[i] + (vals[i + 1] - vals[i]) * (x - (9 + i))


def kernel_fractions(cfg, batch: int, dtype=torch.bfloat16, gpu: str = "h100") -> list[dict]:
    """For each fused kernel of one fusion layer at the preset's shapes: the roofline limit, the design's
    estimated time and the fraction of the limit it reaches. Attention uses the FA3-paper Triton
    anchors at each segment's length (forward anchors also for the backward: no backward anchor)."""
    from mbt_fast.layout import PackedLayout

    M = len(cfg.modality_fusion)
    nb = cfg.num_bottleneck_tokens if cfg.use_bottleneck and M > 1 else 0
    layout = PackedLayout(cfg.modality_fusion, tuple(cfg.num_tokens(m) for m in cfg.modality_fusion), nb)
    seg = layout.attn_segments(fused=nb > 0)
    es = _esize(dtype)
    N, C, H, D = layout.total_rows, cfg.hidden_size, cfg.num_heads, cfg.head_dim
    p = PEAKS[gpu]
    rows = []
    for direction in ("fwd", "bwd"):
        cost = attention_cost(seg, batch, H, D, es, direction)
        rate = sum(attention_flops([s], batch, H, D) * anchor_tflops(s[1] - s[0]) for s in seg) / attention_flops(seg, batch, H, D)
        design_s = cost.tc_flops / (rate * 1e12) + cost.launches * LAUNCH_US * 1e-6
        rows.append(_fraction_row(cost, cost, design_s, p, gpu,
                                  f"anchor Triton {rate:.0f} TFLOP/s (FA3 paper, H100 fp16 fwd, at these segment lengths)"))
    min_bytes = {  # the unavoidable traffic: each input and output once, no partial sums
        "fused:segment_layernorm_fwd": None, "fused:segment_layernorm_bwd": 3 * N * batch * C * es,
        "fused:bias_gelu_fwd": None, "fused:bias_gelu_bwd": 3 * N * batch * cfg.mlp_dim * es,
        "fused:residual_mean_fwd": None, "fused:residual_mean_bwd": None}
    for direction in ("fwd", "bwd"):
        for cost in (layernorm_cost(N * batch, C, M, es, es, direction),
                     bias_gelu_cost(N * batch, cfg.mlp_dim, M, es, direction),
                     residual_mean_cost(N * batch, batch, C, M, nb, nb > 0, True, es, direction)):
            ideal = OpCost(cost.name, cost.cls, cost.tc_flops, cost.vec_flops,
                           min_bytes.get(cost.name) or cost.bytes, launches=0)
            design_s = cost.time_s(gpu)[0]
            rows.append(_fraction_row(cost, ideal, design_s, p, gpu, "bandwidth-bound at peak HBM bandwidth"))
    return rows


def _fraction_row(cost: OpCost, ideal: OpCost, design_s: float, p: dict, gpu: str, basis: str) -> dict:
    compute = ideal.tc_flops / (p["tensor_tflops"] * 1e12) + ideal.vec_flops / (p["fp32_tflops"] * 1e12)
    memory = ideal.bytes / (p["hbm_tbps"] * 1e12)
    limit_s = max(compute, memory)
    return {"kernel": cost.name, "gpu": gpu, "bound": "compute" if compute >= memory else "memory",
            "limit_us": 1e6 * limit_s, "design_us": 1e6 * design_s, "fraction": limit_s / design_s,
            "launches": cost.launches, "basis": basis}


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
def estimate(preset: str = "mbt_base_16x2", batch: int = 8, dtype=torch.bfloat16, backends=BACKENDS, cfg=None) -> dict:
    """The JSON report: per backend counts and roofline ms, and speedups (model estimate)."""
    from mbt_fast.config import MBTConfig

    cfg = cfg or MBTConfig.preset(preset)
    fp32 = dtype == torch.float32
    counters = {b: count_step(cfg, batch, b, dtype) for b in backends}
    out = {"preset": preset, "batch": batch, "label": LABEL, "backends": {}, "speedup": {}}
    for b, c in counters.items():
        out["backends"][b] = {**{k: v for k, v in c.totals().items() if k != "tc_flops"},
                              "est_ms": {g: c.est_ms(g, fp32) for g in PEAKS}}
    for x in backends:
        for base in ("reference", "torch"):
            if x != base and base in counters:
                out["speedup"][f"{x}_over_{base}"] = {
                    g: out["backends"][base]["est_ms"][g] / out["backends"][x]["est_ms"][g] for g in PEAKS}
    return out, counters, cfg


def _fmt(x: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= unit:
            return f"{x / unit:.2f}{s}"
    return f"{x:.0f}"


def format_report(report: dict, counters: dict, cfg, dtype) -> str:
    L = [f"MBT training-step performance model ({LABEL}; nothing here is a measurement)",
         f"preset {report['preset']}  batch {report['batch']}  dtype {str(dtype).replace('torch.', '')}  "
         f"step = forward + per-modality cross-entropy + backward + SGD(momentum) step",
         "peaks: " + "; ".join(f"{p['name']} {p['tensor_tflops']:g} TFLOP/s tensor, {p['fp32_tflops']:g} TFLOP/s fp32, "
                               f"{p['hbm_tbps']:g} TB/s" for p in PEAKS.values())
         + f"; launch {LAUNCH_US:g} us per kernel",
         "per kernel: time = max(FLOPs/peak, bytes/bandwidth) + launch; ideal peaks, so every time is a lower bound",
         "",
         f"{'backend':10s} {'FLOPs':>9s} {'HBM bytes':>10s} {'launches':>9s} {'A100 ms':>9s} {'H100 ms':>9s}   ({LABEL})"]
    for b, r in report["backends"].items():
        L.append(f"{b:10s} {_fmt(r['flops']):>9s} {_fmt(r['hbm_bytes']):>10s} {r['launches']:>9d} "
                 f"{r['est_ms']['a100']:>9.2f} {r['est_ms']['h100']:>9.2f}")
    L += ["", f"speedups ({LABEL}, ratio of roofline times)", f"{'':28s} {'A100':>7s} {'H100':>7s}"]
    for k, v in report["speedup"].items():
        L.append(f"{k:28s} {v['a100']:>7.2f} {v['h100']:>7.2f}")
    fp32 = dtype == torch.float32
    L += ["", f"per op class on H100 ({LABEL}): launches, HBM bytes, ms, dominant term"]
    classes = sorted({c for cnt in counters.values() for c in cnt.by_class("h100", fp32)})
    L.append(f"{'class':12s} " + " ".join(f"{b:>30s}" for b in counters))
    per = {b: cnt.by_class("h100", fp32) for b, cnt in counters.items()}
    for c in classes:
        cells = []
        for b in counters:
            d = per[b].get(c)
            cells.append(f"{d['launches']:>6d} {_fmt(d['hbm_bytes']):>7s}B {d['ms']:>6.2f}ms {d['dominant'][:7]:>7s}"
                         if d else f"{'-':>30s}")
        L.append(f"{c:12s} " + " ".join(f"{x:>30s}" for x in cells))
    L += ["", f"fused kernels of one fusion layer vs their roofline limit (H100, {LABEL})",
          f"{'kernel':32s} {'bound':>8s} {'limit us':>9s} {'design us':>10s} {'fraction':>9s}  basis"]
    for r in kernel_fractions(cfg, report["batch"], dtype):
        L.append(f"{r['kernel']:32s} {r['bound']:>8s} {r['limit_us']:>9.1f} {r['design_us']:>10.1f} "
                 f"{r['fraction']:>9.0%}  {r['basis']}")
    L.append("attention rows: fraction = anchor TFLOP/s / 989 (+ launch); memory-bound rows: minimum bytes at peak "
             "bandwidth / the design's bytes at peak bandwidth + launch. All of it is a model estimate.")
    return "\n".join(L)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Roofline performance model of one MBT training step (model estimate)")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="mbt_base_16x2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object")


def run(args) -> int:
    if args.batch < 1:
        raise ValueError(f"--batch: expected a positive integer, got {args.batch}")
    dtype = _DTYPES[args.dtype]
    t0 = time.perf_counter()
    report, counters, cfg = estimate(args.preset, args.batch, dtype)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, counters, cfg, dtype))
        print(f"(counted on the meta device in {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
