"""Where a training step's time goes, per op class, measured and modelled: one step per backend under
``torch.profiler``, kernel time summed per op class, beside ``mbt_fast.perf_model``'s estimate of the
same classes for the nearest modelled GPU (``by_class``, central efficiencies).

Kernels are classed by name (``classify``): cuBLAS/CUTLASS GEMMs, attention kernels (flash, cuDNN,
memory-efficient, ours), LayerNorm, softmax, elementwise (ours: bias+GELU, residual+bottleneck mean),
reductions, copies, fills, the optimizer's foreach kernels, Inductor's fused kernels and, on a CPU,
the host time of views and allocations. On a GPU the
measured figure is device (kernel) time; on a CPU it is the self CPU time of each aten op, labelled CPU
measurement (the model is for a GPU: a CPU row checks the command, not the model).

    python bench/bench_profile.py                              # GPU: mbt_base_16x2, batch 8
    python bench/bench_profile.py --device cpu --preset tiny --batch 2
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import bench_train, common
from mbt_fast.commands import argtypes

BACKENDS = ("eager_sdpa", "torch", "triton", "cuda")
COLUMNS = ["op", "preset", "backend", "batch", "op_class", "measured_ms", "measured_share", "kernels",
           "model_gpu", "model_ms", "model_share", "model_dominant", "measured_over_model", "top_kernel", "status",
           *common.ENV_COLUMNS]

# first match wins: attention before gemm (fmha_cutlass* names both), Inductor's fused kernels first of all
_CLASSES = (
    ("fused_pointwise", r"^triton_(poi|red|per)_|^triton_tem_"),
    ("attention", r"flash|fmha|attention|_attn|sdpa|mha"),
    ("gemm", r"gemm|xmma|nvjet|cutlass|cublas|aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$|conv"),
    ("layernorm", r"layer_?norm|layernorm"),
    ("softmax", r"softmax"),
    ("optimizer", r"multi_tensor|foreach|_fused_sgd|sgd"),
    ("elementwise", r"bias_gelu|residual_mean|elementwise|gelu|aten::(add|mul|sub|div|where|neg|exp|tanh|pow)_?$"
                    r"|dropout|bernoulli|unrolled|vectorized"),
    ("reduction", r"reduce|aten::(sum|mean|amax|max|nll_loss\w*)$|cross_entropy"),
    # CPU only: views and allocations cost host time but launch no kernel (the model has no such class)
    ("host", r"aten::(slice|select|view|as_strided_?|permute|t|transpose|narrow|expand|unsqueeze|squeeze|flatten|"
             r"unflatten|reshape|_reshape_alias|alias|detach|unbind|split\w*|chunk|resolve_conj|resize_|"
             r"empty\w*|new_empty\w*)$"),
    ("copy", r"copy|cat|memcpy|index|gather|scatter|_backward$|aten::(clone|contiguous|stack|_to_copy|to)$"),
    ("fill", r"fill|memset|zero|aten::(zeros|ones|full)"),
)
_COMPILED = [(cls, re.compile(rx, re.IGNORECASE)) for cls, rx in _CLASSES]


def classify(name: str) -> str:
    """The perf model's op class of a kernel or aten op name; ``other`` when none matches."""
    for cls, rx in _COMPILED:
        if rx.search(name):
            return cls
    return "other"


def profile_step(step, device: torch.device) -> dict[str, dict]:
    """One ``step()`` under the profiler: per class, time in ms, kernel count and the costliest kernel."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    out: dict[str, dict] = {}
    for evt in prof.key_averages():
        if cuda:
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            us = us if us is not None else evt.self_cuda_time_total
        else:
            if not evt.key.startswith("aten::"):  # python and autograd wrapper frames: their aten children count
                continue
            us = evt.self_cpu_time_total
        if us <= 0:
            continue
        c = out.setdefault(classify(evt.key), {"ms": 0.0, "kernels": 0, "top": ("", 0.0)})
        c["ms"] += us / 1e3
        c["kernels"] += evt.count
        if us / 1e3 > c["top"][1]:
            c["top"] = (evt.key, us / 1e3)
    return out


def model_by_class(cfg, batch: int, backend: str, gpu: str) -> dict:
    """The perf model's per-class estimate of the same step (bf16 autocast, as the GPU step runs), on
    that GPU's code paths (segment_linear's grouped GEMM where it has one)."""
    from mbt_fast import perf_model

    return perf_model.count_step(cfg, batch, backend, amp=True, gpu=gpu).by_class(gpu)


def rows_for(preset, cfg, backend, batch, device, gpu, warmup: int) -> list[dict]:
    from mbt_fast.backends import unavailable_reasons

    base = {"op": "train_step_profile", "preset": preset, "backend": backend, "batch": batch, "model_gpu": gpu}
    reasons = unavailable_reasons(backend, device)
    if reasons:
        return [{**base, "status": "unavailable: " + "; ".join(reasons)}]
    try:
        step = bench_train.make_step(cfg, backend, batch, device, amp=device.type == "cuda", compile_=False)
        for _ in range(max(1, warmup)):  # first call: lazy init, Triton compilation, cuBLAS heuristics
            step()
        measured = profile_step(step, device)
        if not measured:
            raise RuntimeError(f"the profiler saw no {'CUDA kernels (is CUPTI available?)' if device.type == 'cuda' else 'aten ops'}")
        model = model_by_class(cfg, batch, backend, gpu)
    except Exception as e:  # noqa: BLE001  (a failing backend is reported, the others go on)
        return [{**base, "status": f"error: {common.short_error(e, 240)}"}]
    m_total = sum(c["ms"] for c in measured.values()) or float("nan")
    e_total = sum(c["ms"] for c in model.values()) or float("nan")
    rows = []
    for cls in sorted(set(measured) | set(model), key=lambda c: -measured.get(c, {"ms": 0})["ms"]):
        m, e = measured.get(cls), model.get(cls)
        rows.append({**base, "op_class": cls, "measured_ms": m["ms"] if m else 0.0,
                     "measured_share": (m["ms"] if m else 0.0) / m_total, "kernels": m["kernels"] if m else 0,
                     "model_ms": e["ms"] if e else 0.0, "model_share": (e["ms"] if e else 0.0) / e_total,
                     "model_dominant": e["dominant"] if e else "",
                     "measured_over_model": m["ms"] / e["ms"] if m and e and e["ms"] > 0 else None,
                     "top_kernel": m["top"][0][:120] if m else "", "status": "ok"})
    rows.append({**base, "op_class": "total", "measured_ms": m_total, "measured_share": 1.0,
                 "kernels": sum(c["kernels"] for c in measured.values()), "model_ms": e_total, "model_share": 1.0,
                 "measured_over_model": m_total / e_total, "status": "ok"})
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None)
    ap.add_argument("--preset", default=None, help="GPU default mbt_base_16x2, CPU default tiny")
    ap.add_argument("--batch", type=argtypes.positive_int, default=None, help="GPU default 8, CPU default 2")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--warmup", type=argtypes.nonneg_int, default=2)
    ap.add_argument("--interpreter", action="store_true", help="CPU: triton under TRITON_INTERPRET=1 (labelled)")
    ap.add_argument("--out", default=None)
    common.add_threads_argument(ap)


def run(args) -> list[dict]:
    from mbt_fast.backend_evidence import gpu_class

    common.set_interpreter(args.interpreter)
    common.pin_threads(args.threads)
    device = common.pick_device(args.device)
    cpu = device.type == "cpu"
    preset, batch = args.preset or ("tiny" if cpu else "mbt_base_16x2"), args.batch or (2 if cpu else 8)
    gpu = gpu_class(common.device_name(device), torch.cuda.get_device_capability(device) if not cpu else None)
    dtype = torch.float32 if cpu else torch.bfloat16
    cfg = bench_train.config(preset)
    rows = []
    for backend in args.backends:
        env = common.env_row(device, dtype, interpreter=backend == "triton" and cpu)
        rows += [{**env, **r} for r in rows_for(preset, cfg, backend, batch, device, gpu, args.warmup)]
        print(f"  profiled {backend}: {rows[-1]['status']}", flush=True)
    env = rows[0] if rows else common.env_row(device, dtype)
    common.publish(rows, common.out_dir(device, args.out), "profile", COLUMNS,
                   ["backend", "op_class", "measured_ms", "kernels", "model_ms", "model_dominant",
                    "measured_over_model", "status"],
                   title=f"\nper op class, one training step ({preset}, batch {batch}) on {env['device']}: "
                         f"measured = {env['measurement']}, model = model estimate for {gpu} (central)",
                   plot_args=None)
    return rows


main = common.main_for(add_arguments, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
