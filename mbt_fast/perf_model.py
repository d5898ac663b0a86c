"""Performance model of one MBT training step per backend (DESIGN.md section 7). **Model estimate.**

For one step (forward, backward, optimizer step) of a preset it counts FLOPs, HBM bytes read + written
and kernel launches, and turns them into a time for A100 and H100 from ONE table of peaks (``PEAKS``)
and ONE table of efficiencies (``EFFICIENCY``, ``ATTENTION_ANCHORS``, ``ATTENTION_DESIGNS``), each a
range: every estimate is reported as low / central / high. Nothing here runs on a GPU or is measured.

How the counts are made:

* the model runs **at its real shapes on the ``meta`` device** (no data, no arithmetic: a
  ``mbt_base_16x2`` step at batch 8 takes seconds on a CPU). By default (``--dtype amp``) it runs as
  training runs: fp32 parameters and inputs under bf16 autocast, emulated op by op as CUDA autocast
  casts (``AutocastEmulation``: GEMMs, convolutions and attention in bf16, LayerNorm, softmax and the
  losses in fp32, weight casts cached per step as autocast caches them, everything else in the dtype
  it is given), so every cast copy and every fp32 LayerNorm output is counted; ``--dtype bf16`` is a
  pure-bf16 step;
* a ``TorchDispatchMode`` sees every aten op executed (forward, autograd backward, optimizer) and
  costs it with ``aten_cost``: GEMM/conv FLOPs from shapes, bytes = every input + every output once
  (a broadcast input counts its distinct elements), one launch per op (a grouped GEMM two: its setup
  kernel and the GEMM), views and allocations free;
* the code paths that depend on the GPU run as they would there: ``ops.segment_linear`` takes its
  grouped GEMM where ``GROUPED_GEMM`` says the GPU has one (H100, not A100), so a step whose count
  differs is counted once per GPU (``count_step_per_gpu``);
* ops the meta device cannot run as on a GPU are replaced by declared per-op formulas, each op
  counted once per call (forward) and once per backward:
  - ``F.scaled_dot_product_attention`` (``eager_sdpa`` and ``torch``): PyTorch's flash kernels
    (FlashAttention-2) — no N x N matrix in HBM (meta would run the math fallback instead);
  - the fused ops of ``mbt_fast.ops`` (``mbt_attention``, ``segment_layernorm``, ``bias_gelu``,
    ``residual_mean``, ``residual_mean_layernorm``) on the ``triton``/``cuda`` backends (``cuda`` runs
    the last one as its two kernels): one launch per fused kernel, bytes = its inputs and outputs once
    (``fused_cost``; partial-sum buffers and their reductions included);
* per kernel, ``time = max(tensor FLOPs / (peak x efficiency) + vector FLOPs / fp32 peak,
  bytes / (bandwidth x efficiency)) + launches x launch cost``; attention kernels run at the TFLOP/s of
  their implementation's design class at the segment lengths (``ATTENTION_DESIGNS``: the anchor it is
  measured against and the fraction of it the design is expected to reach). K/V re-reads of the
  attention kernels are assumed to hit L2 (counted once);
* ``eager_sdpa_compile`` (``torch.compile`` of ``eager_sdpa``) is approximated from the eager op list:
  GEMMs and attention stay as they are (Inductor calls the same cuBLAS and SDPA kernels), and every run
  of consecutive elementwise / LayerNorm / softmax / copy / reduction ops between them becomes one
  kernel (one more per reduction in the run) that reads the run's external inputs once and writes only
  the outputs something outside the run reads later (``compile_fusion``);
* a speedup's range is the smallest and largest ratio over the efficiency scenarios: the shared
  efficiencies (GEMM, bandwidth, launch) low, central or high for both backends alike, and each
  attention design independently at the low or high end of its range.

Backend differences this captures: ``reference`` = Scenic's concat/split/stack/mean copies and an
eager attention that writes and reads the N x N scores (and softmax) per modality; ``eager_sdpa`` =
the same structure with SDPA (the port a user would write); ``torch`` = the packed layout with SDPA
per segment, per-segment LayerNorm and the bias inside the GEMMs; ``triton``/``cuda`` = the fused
kernels, each at its own attention design class.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

LABEL = "model estimate"
BACKENDS = ("reference", "eager_sdpa", "torch", "triton", "cuda")
COMPILED = {"eager_sdpa_compile": "eager_sdpa"}  # approximated from the eager op list (compile_fusion)
BASELINES = ("reference", "eager_sdpa", "eager_sdpa_compile", "torch")

# ---- the one table of peaks (vendors' dense figures, DESIGN.md section 7) -----------------------------
PEAKS = {
    "a100": {"name": "A100 SXM 80GB", "tensor_tflops": 312.0, "fp32_tflops": 19.5, "hbm_tbps": 2.04},
    "h100": {"name": "H100 SXM", "tensor_tflops": 989.0, "fp32_tflops": 67.0, "hbm_tbps": 3.35},
}
# Whether torch._grouped_mm is one kernel there (segment_linear's grouped path, mbt_fast.ops.segment_linear):
# torch's fast path needs compute capability 9.x/10.x and bf16 (CUTLASS); an A100 (8.0) loops over the groups
GROUPED_GEMM = {"a100": False, "h100": True}
SMS = 132  # H100 SXM SMs: sizes the partial-sum buffers of the fused backward kernels (A100: 108)

# ---- the one table of efficiencies: (low, central, high) = (pessimistic, central, optimistic) ---------
SCENARIOS = ("low", "central", "high")
EFFICIENCY = {
    "gemm": {"range": (0.60, 0.70, 0.80), "unit": "fraction of dense tensor peak",
             "source": "assumed: large bf16 cuBLAS GEMMs reach 60-80 % of dense peak (issue 9's range); "
                       "not yet calibrated by a GPU run here"},
    "bandwidth": {"range": (0.80, 0.85, 0.90), "unit": "fraction of peak HBM bandwidth",
                  "source": "assumed: streaming elementwise kernels reach 80-90 % of HBM peak"},
    "launch_us": {"range": (5.0, 4.0, 2.5), "unit": "us per kernel launch",
                  "source": "assumed: host launch + kernel ramp of an eager PyTorch op, 2.5-5 us"},
}
# Attention anchors, H100 SXM, fp16/bf16, head dim 64, non-causal, TFLOP/s at 512 / 1k / 2k tokens:
# FlashAttention-3 paper (Shah et al. 2024), forward and backward figures. The paper has no Triton
# backward: it is taken as Triton's forward times FA2's backward/forward ratio at each length.
ATTENTION_ANCHORS = {
    "fwd": {"FA2": (282.0, 306.0, 318.0), "Triton": (340.0, 382.0, 396.0),
            "cuDNN": (335.0, 373.0, 395.0), "FA3": (333.0, 392.0, 460.0)},
    "bwd": {"FA2": (198.0, 238.0, 264.0), "cuDNN": (266.0, 348.0, 395.0), "FA3": (272.0, 363.0, 422.0)},
}
ATTENTION_ANCHORS["bwd"]["Triton"] = tuple(t * b / f for t, b, f in zip(
    ATTENTION_ANCHORS["fwd"]["Triton"], ATTENTION_ANCHORS["bwd"]["FA2"], ATTENTION_ANCHORS["fwd"]["FA2"]))
ANCHOR_TOKENS = (512, 1024, 2048)
# A100: FlashAttention-2 reaches 50-73 % of the A100's peak in its paper's forward benchmarks; every
# design is scaled from its H100 anchor by FA2's A100/H100 ratio (0.62 x 312 vs 318 TFLOP/s at 2k), and
# the Hopper-only designs (wgmma, TMA) get no more than FA2 there.
A100_SCALE = 0.62 * 312.0 / 318.0
# Each backend's attention: the anchor of its design class and the fraction of it expected (low, central, high)
ATTENTION_DESIGNS = {
    "sdpa_flash": {"anchor": "FA2", "range": (0.85, 1.0, 1.2),
                   "why": "PyTorch SDPA's flash backend is FlashAttention-2; high end: SDPA picks cuDNN (up to 1.25x FA2)"},
    "triton": {"anchor": "Triton", "range": (0.60, 0.80, 0.95),
               "why": "Triton tutorial design class (unmasked main loops, tiles per architecture; TMA and "
                      "P V-under-softmax tiles as sm_90 autotune candidates); range kept until a GPU measures it"},
    "cuda": {"anchor": "FA2", "range": (0.35, 0.50, 0.70),
             "why": "forward at FA2's design (128-row tiles, swizzled cp.async pipeline), backward 64-row tiles "
                    "and 7 GEMMs (deterministic, no atomics); range kept until a GPU measures it (issue 13)"},
}


def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# ----------------------------------------------------------------------------------------------------
# cost records
# ----------------------------------------------------------------------------------------------------
def scenario(level: str = "central", attention: dict | None = None) -> dict:
    """Efficiencies of one scenario: the shared ones at ``level``, each attention design at its own level
    (``attention[impl]``, default ``level``)."""
    i = SCENARIOS.index(level)
    att = {impl: d["range"][SCENARIOS.index((attention or {}).get(impl, level))] for impl, d in ATTENTION_DESIGNS.items()}
    return {"gemm": EFFICIENCY["gemm"]["range"][i], "bandwidth": EFFICIENCY["bandwidth"]["range"][i],
            "launch_us": EFFICIENCY["launch_us"]["range"][i], "attention": att}


CENTRAL = scenario()


@dataclass
class OpCost:
    """One kernel (or a group of identical kernels): what it computes and moves."""

    name: str
    cls: str  # op class: gemm, attention, softmax, layernorm, elementwise, reduction, copy, fill, optimizer, h2d
    tc_flops: float = 0.0  # tensor-core FLOPs (GEMM, conv, attention)
    vec_flops: float = 0.0  # CUDA-core FLOPs (elementwise, reductions), an estimate per element
    bytes: float = 0.0  # HBM bytes read + written
    launches: int = 1
    impl: str = ""  # attention: its design class (ATTENTION_DESIGNS)
    anchor_tflops: dict = field(default_factory=dict)  # attention: anchor TFLOP/s per GPU at its segment lengths
    reads: tuple = ()  # aten ops: ((storage key, bytes), ...) read, for compile_fusion
    writes: tuple = ()

    def time_s(self, gpu: str, fp32_gemm: bool = False, eff: dict = CENTRAL) -> tuple[float, str]:
        """Time under the efficiencies ``eff`` and the term that dominates it: ``compute``, ``memory``, ``launch``."""
        p = PEAKS[gpu]
        if self.cls == "attention" and self.impl and not fp32_gemm:
            rate = self.anchor_tflops[gpu] * eff["attention"][self.impl] * 1e12
        else:
            rate = (p["fp32_tflops"] if fp32_gemm else p["tensor_tflops"]) * eff["gemm"] * 1e12
        compute = self.tc_flops / rate + self.vec_flops / (p["fp32_tflops"] * 1e12)
        memory = self.bytes / (p["hbm_tbps"] * eff["bandwidth"] * 1e12)
        launch = self.launches * eff["launch_us"] * 1e-6
        dominant = max((compute, "compute"), (memory, "memory"), (launch, "launch"))[1]
        return max(compute, memory) + launch, dominant


@dataclass
class Counter:
    ops: list = field(default_factory=list)
    keep: list = field(default_factory=list, repr=False)  # storages kept alive so their keys stay unique

    def add(self, cost: OpCost):
        self.ops.append(cost)

    def totals(self) -> dict:
        return {"flops": sum(o.tc_flops + o.vec_flops for o in self.ops),
                "tc_flops": sum(o.tc_flops for o in self.ops),
                "hbm_bytes": sum(o.bytes for o in self.ops),
                "launches": sum(o.launches for o in self.ops)}

    def _arrays(self, gpu: str, fp32_gemm: bool):
        key = (gpu, fp32_gemm, len(self.ops))
        if getattr(self, "_cache", (None,))[0] != key:
            impls = list(ATTENTION_DESIGNS)
            att = [o.cls == "attention" and bool(o.impl) and not fp32_gemm for o in self.ops]
            self._cache = (key, {
                "tc": np.array([o.tc_flops for o in self.ops]), "vec": np.array([o.vec_flops for o in self.ops]),
                "bytes": np.array([o.bytes for o in self.ops]), "launches": np.array([o.launches for o in self.ops]),
                "anchor": np.array([o.anchor_tflops.get(gpu, 1.0) if a else 0.0 for o, a in zip(self.ops, att)]),
                "impl": np.array([impls.index(o.impl) if a else -1 for o, a in zip(self.ops, att)])})
        return self._cache[1]

    def est_ms(self, gpu: str, fp32_gemm: bool = False, eff: dict = CENTRAL) -> float:
        """The step's time in ms under ``eff`` (vectorised ``OpCost.time_s`` summed over the ops)."""
        a, p = self._arrays(gpu, fp32_gemm), PEAKS[gpu]
        tc_rate = np.full(a["tc"].shape, (p["fp32_tflops"] if fp32_gemm else p["tensor_tflops"]) * eff["gemm"] * 1e12)
        for i, impl in enumerate(ATTENTION_DESIGNS):
            sel = a["impl"] == i
            tc_rate[sel] = a["anchor"][sel] * eff["attention"][impl] * 1e12
        compute = a["tc"] / tc_rate + a["vec"] / (p["fp32_tflops"] * 1e12)
        memory = a["bytes"] / (p["hbm_tbps"] * eff["bandwidth"] * 1e12)
        return 1e3 * float(np.sum(np.maximum(compute, memory) + a["launches"] * eff["launch_us"] * 1e-6))

    def est_range_ms(self, gpu: str, fp32_gemm: bool = False) -> list[float]:
        """[low, high]: every efficiency at its optimistic end, and at its pessimistic end."""
        return [self.est_ms(gpu, fp32_gemm, scenario("high")), self.est_ms(gpu, fp32_gemm, scenario("low"))]

    def impls(self) -> set:
        return {o.impl for o in self.ops if o.cls == "attention" and o.impl}

    def by_class(self, gpu: str, fp32_gemm: bool = False) -> dict:
        """Per op class: counts, central time, and the dominant term (the one holding most of its time)."""
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


def speedup_range(base: Counter, x: Counter, gpu: str, fp32_gemm: bool = False) -> list[float]:
    """[min, max] of ``time(base) / time(x)`` over the scenarios: shared efficiencies low/central/high for
    both, each attention design used by either independently at its low or high end."""
    impls = sorted(base.impls() | x.impls())
    ratios = []
    for level in SCENARIOS:
        for ends in itertools.product(("low", "high"), repeat=len(impls)):
            eff = scenario(level, dict(zip(impls, ends)))
            ratios.append(base.est_ms(gpu, fp32_gemm, eff) / x.est_ms(gpu, fp32_gemm, eff))
    return [min(ratios), max(ratios)]


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
    if name in ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "_grouped_mm"):
        # _grouped_mm: [R, K] x [G, K, O] (or [O, R] x [R, K] -> [G, O, K]): the groups split R, so its
        # FLOPs are those of one [R, K] x [K, O] product; on sm_90 it is two launches (GroupMM.cu: a
        # one-block kernel writing the groups' pointers and shapes, then the CUTLASS grouped GEMM)
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm", "_addmm_activation") else (args[0], args[1])
        epilogue = {"addmm": 1, "baddbmm": 1, "_addmm_activation": 1 + _VEC_PER_ELEM["gelu"]}.get(name, 0)  # bias (+ GELU)
        return OpCost(name, "gemm", tc_flops=_mm_flops(a.shape, b.shape), vec_flops=epilogue * outs[0].numel(),
                      bytes=nbytes, launches=2 if name == "_grouped_mm" else 1)
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
                ins = [t for t in _tensors(args)] + [t for v in (kwargs or {}).values() for t in _tensors(v)]
                cost.reads = tuple(self._io(t) for t in ins)
                cost.writes = tuple(self._io(t) for t in _tensors(out))
                self.counter.add(cost)
        return out

    def _io(self, t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        self.counter.keep.append(storage)  # alive until the count ends: no key is reused by a new tensor
        return storage._cdata, tensor_bytes(t)


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
        return OpCost(name, "attention", tc_flops=fl, vec_flops=0.0, bytes=nbytes, launches=launches, impl=impl,
                      anchor_tflops=design_tflops(impl, "fwd", segments))
    q_b, kv_b = nq * bhd * esize, 2 * nk * bhd * esize
    pre = 2 * q_b + lse  # read o, dO; write delta
    dkdv = 2 * q_b + kv_b + 2 * lse + kv_b  # read q, dO, k, v, lse, delta; write dk, dv
    dq = 2 * q_b + kv_b + 2 * lse + q_b  # read q, dO, k, v, lse, delta; write dq
    nbytes, launches = pre + dkdv + dq, 3
    if impl == "sdpa_flash":  # FA2 backward: fp32 dq accumulator zeroed, accumulated, converted
        acc = 4 * nq * bhd
        nbytes = pre + (2 * q_b + kv_b + 2 * lse + kv_b) + 3 * acc + q_b
        launches = 4
    return OpCost(name, "attention", tc_flops=2.5 * fl, bytes=nbytes, launches=launches, impl=impl,
                  anchor_tflops=design_tflops(impl, "bwd", segments))


def design_tflops(impl: str, direction: str, segments) -> dict:
    """Per GPU, the anchor TFLOP/s of ``impl``'s design class over ``segments`` (each segment at its own
    length, weighted by its FLOPs so that times add up); the design's fraction is applied per scenario."""
    work = [(qe - qs) * (ke - ks) for qs, qe, ks, ke in segments]

    def rate(provider: str) -> float:
        t = sum(w / anchor_tflops(qe - qs, provider, direction) for w, (qs, qe, _, _) in zip(work, segments))
        return sum(work) / t if t else 1.0

    anchor = ATTENTION_DESIGNS[impl]["anchor"]
    h100 = rate(anchor)
    a100 = min(h100, rate("FA2")) if anchor in ("Triton", "FA3") else h100  # Hopper features: no more than FA2 on an A100
    return {"h100": h100, "a100": a100 * A100_SCALE}


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
    x = rows * C * esize  # each slot row is read once: in "mean" mode only the slot programs load the slots
    keep = 4 * batch * M if has_keep else 0
    if direction == "fwd":
        return OpCost("fused:residual_mean_fwd", "elementwise", vec_flops=2 * rows * C, bytes=3 * x + keep)
    # reads g; writes gy, and gx only in "mean" mode (otherwise gx is g itself)
    return OpCost("fused:residual_mean_bwd", "elementwise", vec_flops=rows * C,
                  bytes=x + x + (x if mean else 0) + keep)


def residual_mean_layernorm_cost(rows: int, batch: int, C: int, M: int, n_bottleneck: int, mean: bool,
                                 has_keep: bool, esize: int, MW: int, wsize: int, direction: str) -> OpCost:
    """The Triton kernel fusing ``residual_mean`` and the next ``segment_layernorm`` (``MW`` weight sets):
    x_new is written once and never read back forward; backward, the LayerNorm gradient and grad_x_new
    are added in registers and the residual's gradients written from there (no grad_x_new round trip)."""
    x = rows * C * esize  # each slot row too is read once: only the slot programs load the slots
    keep = 4 * batch * M if has_keep else 0
    stats = 2 * rows * 4  # fp32 mean and rstd
    w = 2 * MW * C * wsize
    rw = 4 * rows
    if direction == "fwd":  # read x, y; write x_new, h
        return OpCost("fused:residual_mean_layernorm_fwd", "layernorm", vec_flops=10 * rows * C,
                      bytes=4 * x + keep + w + rw + stats, launches=1)
    row_progs = min(SMS * 4, rows)
    slot_progs = min(SMS * 4, n_bottleneck * batch) if mean else 0
    part = 2 * (row_progs + slot_progs) * MW * C * 4  # fp32 partial dW, dB per program
    casts = 0 if wsize == 4 else 2
    # read x_new, grad_h, grad_x_new, weight, stats, keep; write gx, gy
    nbytes = 5 * x + keep + w // 2 + stats + rw
    nbytes += part + part + 2 * MW * C * 4 + casts * (MW * C * 4 + MW * C * wsize)
    return OpCost("fused:residual_mean_layernorm_bwd", "layernorm", vec_flops=14 * rows * C, bytes=nbytes,
                  launches=3 + casts)


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


class _DeclaredPairFunction(_DeclaredFunction):
    """``_DeclaredFunction`` for an op returning two outputs of one shape (x_new and h): one declared
    forward, one declared backward for the gradients of both."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        out = _DeclaredFunction.forward(ctx, spec, *inputs)
        return out, torch.empty_like(out)

    @staticmethod
    def backward(ctx, grad_x_new, grad_h):
        return _DeclaredFunction.backward(ctx, grad_h)


@contextlib.contextmanager
def declared_kernels(counter: Counter, impl: str):
    """Replace the fused ops of ``mbt_fast.ops`` (``impl`` triton/cuda) with their declared costs."""
    from mbt_fast import ops

    # key_mask (ragged feature sequences) is not counted: the modelled steps have no padding
    def mbt_attention(q, k, v, segments, *, scale=None, dropout_p=0.0, key_mask=None, backend=None):
        seg = [tuple(int(x) for x in row) for row in torch.as_tensor(segments).reshape(-1, 4).tolist()]
        _, B, H, D = q.shape
        es = q.element_size()
        return _declared(counter, attention_cost(seg, B, H, D, es, "fwd", impl),
                         attention_cost(seg, B, H, D, es, "bwd", impl), q.shape, q.dtype, q, k, v)

    def mbt_attention_qkv(qkv, segments, *, scale=None, dropout_p=0.0, key_mask=None, backend=None):
        if impl != "triton":  # the per-tensor kernels: autograd stacks dq, dk, dv into qkv's gradient
            return mbt_attention(*qkv.unbind(2), segments, scale=scale, dropout_p=dropout_p)
        seg = [tuple(int(x) for x in row) for row in torch.as_tensor(segments).reshape(-1, 4).tolist()]
        N, B, _, H, D = qkv.shape
        es = qkv.element_size()
        return _declared(counter, attention_cost(seg, B, H, D, es, "fwd", impl),
                         attention_cost(seg, B, H, D, es, "bwd", impl), (N, B, H, D), qkv.dtype, qkv)

    def segment_layernorm(x, weight, bias, row_weight, eps=1e-6, *, segments=None, backend=None):
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

    def residual_mean_layernorm(x, y, keep, layout, bottleneck, weight, bias, row_weight, eps=1e-6, *, segments=None,
                                backend=None):
        if impl != "triton":  # no fused CUDA kernel: the op runs the two CUDA kernels
            x_new = residual_mean(x, y, keep, layout, bottleneck)
            return x_new, segment_layernorm(x_new, weight, bias, row_weight, eps)
        N, B, C = x.shape
        mean = bottleneck == "mean" and layout.n_bottleneck > 0
        args = (N * B, B, C, layout.num_modalities, layout.n_bottleneck, mean, keep is not None, x.element_size(),
                weight.shape[0], weight.element_size())
        spec = {"counter": counter, "fwd": residual_mean_layernorm_cost(*args, "fwd"),
                "bwd": residual_mean_layernorm_cost(*args, "bwd"), "out_shape": tuple(x.shape), "out_dtype": x.dtype}
        return _DeclaredPairFunction.apply(spec, x, y, weight, bias)

    with mock.patch.multiple(ops, mbt_attention=mbt_attention, mbt_attention_qkv=mbt_attention_qkv,
                             segment_layernorm=segment_layernorm, residual_mean_layernorm=residual_mean_layernorm,
                             bias_gelu=bias_gelu, residual_mean=residual_mean), \
            mock.patch.object(importlib.import_module("mbt_fast.ops.bias_gelu"), "bias_gelu", bias_gelu):  # linear_bias_gelu's
        yield


@contextlib.contextmanager
def declared_sdpa(counter: Counter):
    """``F.scaled_dot_product_attention`` as PyTorch's flash kernels on a GPU (meta runs the math path)."""

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = (AutocastEmulation.cast_lower(t) for t in (q, k, v))  # SDPA is on autocast's bf16 list
        B, H, nq, D = q.shape
        nk = k.shape[-2]
        seg = [(0, nq, 0, nk)]
        es = q.element_size()
        return _declared(counter, attention_cost(seg, B, H, D, es, "fwd", "sdpa_flash"),
                         attention_cost(seg, B, H, D, es, "bwd", "sdpa_flash"), q.shape, q.dtype, q, k, v)

    with mock.patch.object(F, "scaled_dot_product_attention", sdpa):
        yield


class AutocastEmulation(TorchFunctionMode):
    """CUDA autocast (bf16) for meta tensors, which have no autocast of their own: the functions on
    autocast's lower-precision list get their fp32 floating inputs cast to bf16 (casts of parameters
    cached for the step, as autocast caches them), those on its fp32 list get half inputs cast to fp32,
    everything else runs in the dtypes it is given. The casts are ordinary ``.to`` calls, so the counter
    sees their kernels and autograd records them as autocast's do."""

    active: "AutocastEmulation | None" = None
    LOWER = {F.linear, torch.conv2d, torch.conv3d, F.conv2d, F.conv3d, torch.addmm, torch.mm, torch.bmm, torch.baddbmm,
             torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
    FP32 = {F.layer_norm, torch.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
            torch.log_softmax, torch.Tensor.log_softmax, F.cross_entropy, F.binary_cross_entropy_with_logits,
            F.mse_loss}

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype, self.cache = dtype, {}

    def __enter__(self):
        AutocastEmulation.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        AutocastEmulation.active = None
        return super().__exit__(*exc)

    @staticmethod
    def cast_lower(t):
        self = AutocastEmulation.active
        if self is None or not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        if t.is_leaf and t.requires_grad:  # autocast's cache: one cast per parameter per step
            if id(t) not in self.cache:
                self.cache[id(t)] = (t, t.to(self.dtype))
            return self.cache[id(t)][1]
        return t.to(self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOWER:
            cast = self.cast_lower
        elif func in self.FP32:
            def cast(t):
                return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
        else:
            return func(*args, **kwargs)
        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# one training step on meta
# ----------------------------------------------------------------------------------------------------
def _meta_model(cfg, dtype):
    from mbt_fast.model import MBT

    with torch.device("meta"):
        model = MBT(cfg, backend="torch")
    return model.to(dtype).train()


def _inputs(cfg, batch: int, dtype):
    return {m: torch.empty(batch, *cfg.input_shape(m), dtype=dtype, device="meta") for m in cfg.modality_fusion}


_AUTOCAST = torch.autocast


@contextlib.contextmanager
def counting(counter: Counter, backend: str, amp: bool = False, gpu: str | None = None):
    """Count everything run inside on meta tensors as ``backend`` would run it on a GPU (``amp``: under
    bf16 autocast, emulated; ``gpu``: a key of ``PEAKS`` whose GEMM paths to take, None: per-segment GEMMs)."""
    def autocast_dtype(device_type):  # meta has no autocast state; under amp it reports the emulated one
        return torch.bfloat16 if amp and device_type == "meta" else real_autocast_dtype(device_type)

    def autocast(device_type, *args, **kwargs):  # ops.segment_linear switches autocast off around its GEMMs
        return contextlib.nullcontext() if device_type == "meta" else _AUTOCAST(device_type, *args, **kwargs)

    linear_module = importlib.import_module("mbt_fast.ops.segment_linear")  # the package re-exports the function
    real_autocast_dtype = linear_module.autocast_dtype
    aten = AtenCounter(counter)

    def group_plan(*args):  # segment_linear's device tables: built once per layout, not per step
        aten.paused += 1
        try:
            return real_group_plan(*args)
        finally:
            aten.paused -= 1

    real_group_plan = linear_module.group_plan
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("mbt_fast.model.resolved_backend", lambda b, device_type=None: b))
        stack.enter_context(mock.patch.object(linear_module, "autocast_dtype", autocast_dtype))
        stack.enter_context(mock.patch.object(linear_module, "device_has_grouped_gemm",
                                              lambda device: bool(gpu and GROUPED_GEMM[gpu])))
        stack.enter_context(mock.patch.object(linear_module, "group_plan", group_plan))
        stack.enter_context(mock.patch.object(torch, "autocast", autocast))
        if backend in ("triton", "cuda"):
            stack.enter_context(declared_kernels(counter, backend))
        stack.enter_context(declared_sdpa(counter))
        stack.enter_context(aten)
        if amp:
            stack.enter_context(AutocastEmulation())
        yield counter


def count_step(cfg, batch: int, backend: str, dtype=torch.bfloat16, momentum: float = 0.9, amp: bool = False,
               gpu: str | None = None) -> Counter:
    """Counts of one training step: forward, per-modality cross-entropy, backward, SGD (momentum) step.
    ``amp``: fp32 parameters and inputs under (emulated) bf16 autocast, as training runs; else all in ``dtype``.
    ``gpu``: the GPU whose code paths the step takes (segment_linear's grouped GEMM), None: per-segment GEMMs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    dtype = torch.float32 if amp else dtype
    model = _meta_model(cfg, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=momentum, foreach=True)
    for p in params:  # momentum buffers exist after the first step; a steady-state step is counted
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    inputs = _inputs(cfg, batch, dtype)
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    counter = Counter()
    model.backend = backend  # set directly: the fast backends cannot be resolved for meta tensors
    with counting(counter, backend, amp, gpu):
        logits = model.forward_per_modality(**inputs)
        loss = sum(F.cross_entropy(v.float(), labels) for v in logits.values()) / len(logits)
    with counting(counter, backend, gpu=gpu):  # backward and optimizer step outside autocast, as in training
        loss.backward()
        opt.step()
    return counter


def count_step_per_gpu(cfg, batch: int, backend: str, dtype=torch.bfloat16, amp: bool = False) -> dict:
    """``{gpu: Counter}`` for every GPU of ``PEAKS``: the step is counted first on a GPU with a grouped GEMM,
    and again for the others only if that count took the grouped path (otherwise their code is the same)."""
    order = sorted(PEAKS, key=lambda g: not GROUPED_GEMM[g])
    first = count_step(cfg, batch, backend, dtype, amp=amp, gpu=order[0])
    grouped = any(o.name == "_grouped_mm" for o in first.ops)
    return {g: first if g == order[0] or not grouped else count_step(cfg, batch, backend, dtype, amp=amp, gpu=g)
            for g in PEAKS}


_FUSABLE = {"elementwise", "layernorm", "softmax", "copy", "reduction", "fill"}
_REDUCTIONS = {"layernorm", "softmax", "reduction"}


def compile_fusion(counter: Counter) -> Counter:
    """The ``torch.compile`` approximation: each run of consecutive fusable aten ops (between GEMMs,
    attention and optimizer kernels) becomes one kernel per reduction in it (at least one), reading the
    storages the run did not produce once and writing those something outside the run reads later or
    that existed before it (parameters, gradients, buffers); outputs nothing reads are dead code."""
    ops = counter.ops
    first_seen, read_at = {}, defaultdict(list)
    for i, o in enumerate(ops):
        for k, _ in o.reads:
            first_seen.setdefault(k, i)
            read_at[k].append(i)
        for k, _ in o.writes:
            first_seen.setdefault(k, i)
    out = Counter(keep=counter.keep)
    run: list[int] = []

    def flush():
        if not run:
            return
        lo, hi = run[0], run[-1]
        produced, reads, writes = set(), {}, {}
        for i in run:
            for k, b in ops[i].reads:
                if k not in produced:
                    reads[k] = max(reads.get(k, 0), b)
            for k, b in ops[i].writes:
                produced.add(k)
                if first_seen[k] < lo or any(j > hi for j in read_at[k]):
                    writes[k] = max(writes.get(k, 0), b)
        n_red = sum(ops[i].cls in _REDUCTIONS for i in run)
        out.add(OpCost(f"compiled:{len(run)}_ops", ops[lo].cls if len(run) == 1 else "fused_pointwise",
                       vec_flops=sum(ops[i].vec_flops for i in run), bytes=sum(reads.values()) + sum(writes.values()),
                       launches=max(1, n_red)))
        run.clear()

    for i, o in enumerate(ops):
        if o.cls in _FUSABLE and (o.reads or o.writes):
            run.append(i)
        else:
            flush()
            out.add(o)
    flush()
    return out


# ----------------------------------------------------------------------------------------------------
# the fused kernels against their roofline
# ----------------------------------------------------------------------------------------------------
def anchor_tflops(tokens: float, provider: str = "Triton", direction: str = "fwd") -> float:
    """Anchor TFLOP/s at ``tokens`` (linear in log2(tokens) between the 512/1k/2k points, clamped)."""
    vals = ATTENTION_ANCHORS[direction][provider]
    x = min(max(math.log2(max(tokens, 1)), 9.0), 11.0)
    i = min(int(x) - 9, 1)
    return vals[i] + (vals[i + 1] - vals[i]) * (x - (9 + i))


def kernel_fractions(cfg, batch: int, dtype=torch.bfloat16, gpu: str = "h100") -> list[dict]:
    """For each fused kernel of one fusion layer at the preset's shapes: the roofline limit, the design's
    estimated time (central efficiencies) and the fraction of the limit it reaches. Attention runs at the
    ``triton`` design's central rate at each segment's length."""
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
        rate = cost.anchor_tflops[gpu] * CENTRAL["attention"]["triton"]
        design_s = cost.time_s(gpu)[0]
        rows.append(_fraction_row(cost, cost, design_s, p, gpu,
                                  f"triton design {rate:.0f} TFLOP/s ({CENTRAL['attention']['triton']:.0%} of the Triton "
                                  f"anchor, FA3 paper, at these segment lengths)"))
    min_bytes = {  # the unavoidable traffic: each input and output once, no partial sums
        "fused:segment_layernorm_fwd": None, "fused:segment_layernorm_bwd": 3 * N * batch * C * es,
        "fused:bias_gelu_fwd": None, "fused:bias_gelu_bwd": 3 * N * batch * cfg.mlp_dim * es,
        "fused:residual_mean_fwd": None, "fused:residual_mean_bwd": None,
        "fused:residual_mean_layernorm_fwd": None, "fused:residual_mean_layernorm_bwd": 5 * N * batch * C * es}
    for direction in ("fwd", "bwd"):
        for cost in (layernorm_cost(N * batch, C, M, es, es, direction),
                     bias_gelu_cost(N * batch, cfg.mlp_dim, M, es, direction),
                     residual_mean_cost(N * batch, batch, C, M, nb, nb > 0, True, es, direction),
                     # the attention's closing residual ("add" in a fusion layer) with norm2
                     residual_mean_layernorm_cost(N * batch, batch, C, M, nb, False, True, es, M, es, direction)):
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
def estimate(preset: str = "mbt_base_16x2", batch: int = 8, dtype=torch.bfloat16, backends=BACKENDS, cfg=None,
             amp: bool = True) -> dict:
    """The JSON report: per backend counts and ms (central and [low, high]), speedups with their ranges,
    and the efficiency table they come from (model estimate)."""
    from mbt_fast.config import MBTConfig

    cfg = cfg or MBTConfig.preset(preset)
    fp32 = dtype == torch.float32 and not amp
    # per backend and GPU: the GEMM paths differ by GPU (segment_linear's grouped GEMM on an H100 only)
    per_gpu = {b: count_step_per_gpu(cfg, batch, b, dtype, amp=amp) for b in backends}
    for name, eager in COMPILED.items():
        if eager in per_gpu:
            fused = {}
            for g, c in per_gpu[eager].items():
                if id(c) not in fused:
                    fused[id(c)] = compile_fusion(c)
            per_gpu[name] = {g: fused[id(c)] for g, c in per_gpu[eager].items()}
    counters = {b: v["h100"] for b, v in per_gpu.items()}  # totals and the per-class table: the H100 step
    out = {"preset": preset, "batch": batch, "label": LABEL,
           "precision": "bf16 autocast, fp32 parameters (emulated)" if amp else str(dtype).replace("torch.", ""),
           "efficiency": {**{k: {"low_central_high": v["range"], "unit": v["unit"], "source": v["source"]}
                             for k, v in EFFICIENCY.items()},
                          "attention": {impl: {"anchor": d["anchor"], "fraction_low_central_high": d["range"], "why": d["why"]}
                                        for impl, d in ATTENTION_DESIGNS.items()},
                          "attention_anchors_tflops": {"tokens": ANCHOR_TOKENS, **ATTENTION_ANCHORS,
                                                       "source": "FlashAttention-3 paper (Shah et al. 2024), H100 SXM, "
                                                                 "head dim 64; Triton bwd derived; A100 scaled by FA2's ratio"}},
           "backends": {}, "speedup": {}}
    for b, c in counters.items():
        by_gpu = per_gpu[b]
        out["backends"][b] = {**{k: v for k, v in c.totals().items() if k != "tc_flops"},
                              "launches_by_gpu": {g: by_gpu[g].totals()["launches"] for g in PEAKS},
                              # GEMM calls (cuBLAS / grouped) and their kernel launches (a grouped call is two)
                              "gemm_calls_by_gpu": {g: sum(o.cls == "gemm" for o in by_gpu[g].ops) for g in PEAKS},
                              "gemm_launches_by_gpu": {g: sum(o.launches for o in by_gpu[g].ops if o.cls == "gemm")
                                                       for g in PEAKS},
                              "est_ms": {g: by_gpu[g].est_ms(g, fp32) for g in PEAKS},
                              "est_ms_range": {g: by_gpu[g].est_range_ms(g, fp32) for g in PEAKS}}
    for x in counters:
        for base in BASELINES:
            if x != base and base in counters and not (x in COMPILED and base in ("torch",)):
                entry = {g: out["backends"][base]["est_ms"][g] / out["backends"][x]["est_ms"][g] for g in PEAKS}
                entry.update({f"{g}_range": speedup_range(per_gpu[base][g], per_gpu[x][g], g, fp32) for g in PEAKS})
                out["speedup"][f"{x}_over_{base}"] = entry
    return out, counters, cfg


def _fmt(x: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= unit:
            return f"{x / unit:.2f}{s}"
    return f"{x:.0f}"


def format_report(report: dict, counters: dict, cfg, dtype) -> str:
    fp32 = report["precision"] == "float32"
    L = [f"MBT training-step performance model ({LABEL}; nothing here is a measurement)",
         f"preset {report['preset']}  batch {report['batch']}  precision {report['precision']}  "
         f"step = forward + per-modality cross-entropy + backward + SGD(momentum) step",
         "peaks: " + "; ".join(f"{p['name']} {p['tensor_tflops']:g} TFLOP/s tensor, {p['fp32_tflops']:g} TFLOP/s fp32, "
                               f"{p['hbm_tbps']:g} TB/s" for p in PEAKS.values()),
         "per kernel: time = max(tensor FLOPs/(peak x eff) + vector FLOPs/fp32 peak, bytes/(bandwidth x eff)) + launches x launch",
         "", f"efficiencies (low / central / high; {LABEL} inputs):"]
    for k, v in EFFICIENCY.items():
        L.append(f"  {k:12s} {' / '.join(f'{x:g}' for x in v['range']):>18s}  {v['unit']}; {v['source']}")
    for impl, d in ATTENTION_DESIGNS.items():
        L.append(f"  attn {impl:7s} {' / '.join(f'{x:g}' for x in d['range']):>18s}  x {d['anchor']} anchor; {d['why']}")
    L.append("  attention anchors (H100, head dim 64, TFLOP/s at 512/1k/2k tokens; FlashAttention-3 paper): " + "; ".join(
        f"{prov} {dr} {'/'.join(f'{x:.0f}' for x in v)}" for dr, t in ATTENTION_ANCHORS.items() for prov, v in t.items()))
    L += ["", f"{'backend':19s} {'FLOPs':>9s} {'HBM bytes':>10s} {'launches':>9s} {'GEMM calls A100/H100':>21s} "
              f"{'A100 ms [low, high]':>26s} {'H100 ms [low, high]':>26s}   ({LABEL}; FLOPs, bytes, launches: H100 step)"]
    for b, r in report["backends"].items():
        cells = [f"{r['est_ms'][g]:8.2f} [{r['est_ms_range'][g][0]:6.2f}, {r['est_ms_range'][g][1]:6.2f}]" for g in PEAKS]
        gemms = "/".join(str(r["gemm_calls_by_gpu"][g]) for g in PEAKS)
        L.append(f"{b:19s} {_fmt(r['flops']):>9s} {_fmt(r['hbm_bytes']):>10s} {r['launches']:>9d} {gemms:>21s} "
                 f"{cells[0]:>26s} {cells[1]:>26s}")
    L += ["", f"speedups ({LABEL}: central [range over the efficiency scenarios])",
          f"{'':36s} {'A100':>22s} {'H100':>22s}"]
    for k, v in report["speedup"].items():
        cells = [f"{v[g]:5.2f} [{v[g + '_range'][0]:4.2f}, {v[g + '_range'][1]:4.2f}]" for g in PEAKS]
        L.append(f"{k:36s} {cells[0]:>22s} {cells[1]:>22s}")
    L += ["", f"per op class on H100 ({LABEL}, central): launches, HBM bytes, ms, dominant term"]
    classes = sorted({c for cnt in counters.values() for c in cnt.by_class("h100", fp32)})
    L.append(f"{'class':16s} " + " ".join(f"{b:>30s}" for b in counters))
    per = {b: cnt.by_class("h100", fp32) for b, cnt in counters.items()}
    for c in classes:
        cells = []
        for b in counters:
            d = per[b].get(c)
            cells.append(f"{d['launches']:>6d} {_fmt(d['hbm_bytes']):>7s}B {d['ms']:>6.2f}ms {d['dominant'][:7]:>7s}"
                         if d else f"{'-':>30s}")
        L.append(f"{c:16s} " + " ".join(f"{x:>30s}" for x in cells))
    L += ["", f"fused kernels of one fusion layer vs their roofline limit (H100, {LABEL})",
          f"{'kernel':32s} {'bound':>8s} {'limit us':>9s} {'design us':>10s} {'fraction':>9s}  basis"]
    for r in kernel_fractions(cfg, report["batch"], torch.bfloat16):
        L.append(f"{r['kernel']:32s} {r['bound']:>8s} {r['limit_us']:>9.1f} {r['design_us']:>10.1f} "
                 f"{r['fraction']:>9.0%}  {r['basis']}")
    L.append("limit = the kernel's FLOPs at 100 % of the tensor peak or its minimum bytes at 100 % of HBM bandwidth; "
             "design = its modelled time at the central efficiencies. All of it is a model estimate.")
    return "\n".join(L)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Roofline performance model of one MBT training step (model estimate)")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="mbt_base_16x2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=["amp", *sorted(_DTYPES)], default="amp",
                    help="amp (default): fp32 parameters under bf16 autocast, as training runs; else a pure step in that dtype")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object")


def run(args) -> int:
    if args.batch < 1:
        raise ValueError(f"--batch: expected a positive integer, got {args.batch}")
    amp = args.dtype == "amp"
    dtype = torch.float32 if amp else _DTYPES[args.dtype]
    t0 = time.perf_counter()
    report, counters, cfg = estimate(args.preset, args.batch, dtype, amp=amp)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, counters, cfg, dtype))
        print(f"(counted on the meta device in {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
