"""Multimodal bottleneck attention: every provider on the packed layout of a fusion layer.

Each modality's queries (its tokens and its bottleneck copy) attend to ``[modality | bottleneck]``
(``PackedLayout.attn_segments(fused=True)``); q, k, v are token-major ``[N, B, H, D]``.

Providers: ``eager`` (masked full N x N attention in PyTorch), ``sdpa`` (the torch backend: one SDPA
call per segment), ``flex`` (FlexAttention with a document mask; compiled on a GPU, eager on a CPU),
``flash_attn`` (``flash_attn_varlen_func``, if installed; includes the [N,B]<->[B,N] transposes its
varlen layout needs), ``triton`` and ``cuda`` (the mbt_fast backends). A provider that cannot run is
reported as ``unavailable: why``. TFLOP/s use ``4*B*H*nq*nk*D`` per segment (x2.5 backward, x3.5
fwd+bwd); GB/s use the flash-style minimum traffic of ``mbt_fast.perf_model.attention_cost``
(q, k, v, out, LSE once), the same for every provider.

    python bench/bench_attention.py                 # GPU: MBT-B shapes and a sweep; CPU: --quick shapes
    python bench/bench_attention.py --quick         # small shapes (the CPU default), CPU measurement
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common
from mbt_fast.commands import argtypes

PROVIDERS = ("eager", "sdpa", "flex", "flash_attn", "triton", "cuda")
MODES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = ["op", "provider", "mode", "tokens", "n_bottleneck", "batch", "heads", "head_dim", "rows", "median_ms",
           "p20_ms", "p80_ms", "reps", "tflops", "gbps", "peak_mem_mb", "mem_method", "status", "note",
           *common.ENV_COLUMNS]


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def layout_segments(tokens: tuple[int, ...], n_bottleneck: int):
    from mbt_fast.layout import PackedLayout

    names = ("spectrogram", "rgb", "m2", "m3")[:len(tokens)]
    layout = PackedLayout(names, tuple(tokens), n_bottleneck)
    return layout, tuple(layout.attn_segments(fused=n_bottleneck > 0))


# ---- providers: each returns ``fn(q, k, v) -> out`` for fixed segments, or raises Unavailable -----------
def make_eager(segments, n: int, device, dtype, mode: str):
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    for qs, qe, ks, ke in segments:
        allowed[qs:qe, ks:ke] = True

    def fn(q, k, v):
        qf, kf, vf = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, N, D] views
        s = (qf @ kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        return (p @ vf).permute(2, 0, 1, 3)
    return fn, "full N x N scores, masked"


def make_sdpa(segments, n, device, dtype, mode):
    from mbt_fast import ops

    return (lambda q, k, v: ops.mbt_attention(q, k, v, segments, backend="torch")), "torch backend: SDPA per segment"


def make_flex(segments, n, device, dtype, mode, compile_cpu: bool = False):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.flex_attention not importable ({e})")
    if device.type == "cpu" and mode != "fwd":
        raise Unavailable("FlexAttention has no backward on the CPU (torch raises NotImplementedError)")
    doc = torch.full((n,), -1, dtype=torch.int32, device=device)
    for i, (qs, qe, ks, ke) in enumerate(segments):
        if (qs, qe) != (ks, ke):
            raise Unavailable("the document mask needs key range == query range per segment")
        doc[qs:qe] = i

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (doc[q_idx] >= 0)

    try:
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=str(device))
    except Exception as e:  # noqa: BLE001  (report any failure as the reason)
        raise Unavailable(f"create_block_mask failed: {common.short_error(e)}")
    compiled = device.type == "cuda" or compile_cpu
    attn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    note = "torch.compile(flex_attention)" if compiled else "eager flex_attention (unfused fallback, no compile)"

    def fn(q, k, v):
        with warnings.catch_warnings():  # eager flex warns that it is unfused: the note says so
            warnings.simplefilter("ignore", UserWarning)
            o = attn(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), block_mask=block_mask)
        return o.permute(2, 0, 1, 3)
    return fn, note


def make_flash_attn(segments, n, device, dtype, mode):
    if importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash_attn is not installed")
    if device.type != "cuda":
        raise Unavailable("flash_attn needs a CUDA device")
    if dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable(f"flash_attn runs fp16/bf16 only, got {dtype}")
    from flash_attn import flash_attn_varlen_func

    for qs, qe, ks, ke in segments:
        if (qs, qe) != (ks, ke):
            raise Unavailable("varlen needs key range == query range per segment")
    lens = [qe - qs for qs, qe, _, _ in segments]
    if sum(lens) != n:
        raise Unavailable("varlen needs the segments to cover every row")

    def fn(q, k, v):
        N, B, H, D = q.shape
        # varlen packs whole sequences: [N, B] -> [B, N] (copies), one sequence per (sample, segment)
        cu = torch.tensor([0] + [b * N + s for b in range(B) for s in _cumsum(lens)], dtype=torch.int32, device=q.device)
        qv, kv, vv = (t.transpose(0, 1).reshape(B * N, H, D) for t in (q, k, v))
        o = flash_attn_varlen_func(qv, kv, vv, cu, cu, max(lens), max(lens))
        return o.view(B, N, H, D).transpose(0, 1)
    return fn, "flash_attn_varlen_func, with [N,B]<->[B,N] copies"


def _cumsum(xs):
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


def make_backend(name):
    def make(segments, n, device, dtype, mode):
        from mbt_fast import ops
        from mbt_fast.backends import triton_interpreting, unavailable_reasons

        reasons = unavailable_reasons(name, device)
        if reasons:
            raise Unavailable("; ".join(reasons))
        note = "Triton interpreter: timing meaningless for performance" if name == "triton" and device.type == "cpu" \
            and triton_interpreting() else f"{name} backend"
        return (lambda q, k, v: ops.mbt_attention(q, k, v, segments, backend=name)), note
    return make


MAKERS = {"eager": make_eager, "sdpa": make_sdpa, "flex": make_flex, "flash_attn": make_flash_attn,
          "triton": make_backend("triton"), "cuda": make_backend("cuda")}


# ---- one measurement ----------------------------------------------------------------------------------
def measure(fn, q, k, v, mode: str, device, warmup: int, reps: int) -> tuple[dict, float | None, str]:
    if mode == "fwd":
        with torch.no_grad():
            run = lambda: fn(q, k, v)  # noqa: E731
            run()
            return common.time_fn(run, device, warmup, reps), *common.peak_memory(run, device)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    g = torch.randn_like(out)
    if mode == "bwd":
        run = lambda: torch.autograd.grad(out, leaves, g, retain_graph=True)  # noqa: E731
    else:
        run = lambda: torch.autograd.grad(fn(*leaves), leaves, g)  # noqa: E731
    return common.time_fn(run, device, warmup, reps), *common.peak_memory(run, device)


def bench_case(provider, tokens, nb, batch, heads, head_dim, mode, device, dtype, args) -> dict:
    from mbt_fast.perf_model import attention_cost, attention_flops

    layout, seg = layout_segments(tokens, nb)
    n = layout.total_rows
    row = {"op": "mbt_attention", "provider": provider, "mode": mode, "tokens": "+".join(map(str, tokens)),
           "n_bottleneck": nb, "batch": batch, "heads": heads, "head_dim": head_dim, "rows": n, "note": ""}
    try:
        maker = MAKERS[provider]
        fn, note = maker(seg, n, device, dtype, mode, args.flex_compile) if provider == "flex" else \
            maker(seg, n, device, dtype, mode)
        row["note"] = note
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(n, batch, heads, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        t, mem, how = measure(fn, q, k, v, mode, device, args.warmup, args.reps)
    except Unavailable as e:
        return {**row, **common.unavailable_row(f"unavailable: {e}")}
    except Exception as e:  # noqa: BLE001  (a benchmark reports a failing provider and goes on)
        return {**row, **common.unavailable_row(f"error: {common.short_error(e)}")}
    fl = attention_flops(seg, batch, heads, head_dim)
    es = torch.empty((), dtype=dtype).element_size()
    fwd_b = attention_cost(seg, batch, heads, head_dim, es, "fwd").bytes
    bwd_b = attention_cost(seg, batch, heads, head_dim, es, "bwd").bytes
    flops = {"fwd": fl, "bwd": 2.5 * fl, "fwd+bwd": 3.5 * fl}[mode]
    nbytes = {"fwd": fwd_b, "bwd": bwd_b, "fwd+bwd": fwd_b + bwd_b}[mode]
    s = t["median_ms"] * 1e-3
    return {**row, **t, "tflops": flops / s / 1e12, "gbps": nbytes / s / 1e9, "peak_mem_mb": mem, "mem_method": how,
            "status": "ok"}


# ---- CLI ----------------------------------------------------------------------------------------------
def _tokens(s: str) -> tuple[int, ...]:
    try:
        t = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens: expected comma-separated token counts like 401,3137, got {s!r}")
    if not t or min(t) < 1:
        raise argparse.ArgumentTypeError(f"--tokens: expected positive counts, got {s!r}")
    return t


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when visible)")
    ap.add_argument("--dtype", choices=sorted(common.DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--tokens", type=_tokens, nargs="+", default=None,
                    help="modality token counts (CLS included), e.g. 401,3137 (MBT-B)")
    ap.add_argument("--batch", type=argtypes.positive_int, nargs="+", default=None)
    ap.add_argument("--heads", type=argtypes.positive_int, default=None)
    ap.add_argument("--head-dim", type=argtypes.positive_int, default=None)
    ap.add_argument("--n-bottleneck", type=argtypes.nonneg_int, default=5, help="bottleneck rows per modality (MBT-B: 4 + CLS = 5)")
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    ap.add_argument("--interpreter", action="store_true",
                    help="CPU: run triton under TRITON_INTERPRET=1 (labelled 'interpreter'; meaningless as performance)")
    ap.add_argument("--flex-compile", action="store_true", help="CPU: torch.compile FlexAttention (slow to compile)")
    ap.add_argument("--warmup", type=argtypes.nonneg_int, default=None)
    ap.add_argument("--reps", type=argtypes.positive_int, default=None)
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    ap.add_argument("--no-plot", action="store_true")
    common.add_threads_argument(ap)


def run(args) -> list[dict]:
    common.pin_threads(args.threads)
    common.set_interpreter(args.interpreter)
    device = common.pick_device(args.device)
    quick = args.quick or device.type == "cpu"
    dtype = common.DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    if quick:
        tokens = args.tokens or [(17, 33), (33, 97)]
        batches = args.batch or [1, 2]
        heads, head_dim = args.heads or 2, args.head_dim or 32
        warmup, reps = args.warmup if args.warmup is not None else 1, args.reps or 5
    else:
        tokens = args.tokens or [(401, 3137), (101, 401), (401, 1569), (801, 6273)]
        batches = args.batch or [1, 2, 4, 8]
        heads, head_dim = args.heads or 12, args.head_dim or 64
        warmup, reps = args.warmup if args.warmup is not None else 5, args.reps or 30
    args.warmup, args.reps = warmup, reps
    env = common.env_row(device, dtype)
    out = common.out_dir(device, args.out)
    rows = []
    for tok in tokens:
        for b in batches:
            for mode in args.modes:
                for p in args.providers:
                    r = bench_case(p, tok, args.n_bottleneck, b, heads, head_dim, mode, device, dtype, args)
                    if p == "triton" and device.type == "cpu" and r["status"] == "ok":
                        r = {**r, **common.env_row(device, dtype, interpreter=True)}
                    rows.append({**env, **r} if "measurement" not in r else {**env, **r})
                    _echo(rows[-1])
                    common.write_csv(rows, out / "attention.csv", COLUMNS)  # a run killed at its time budget keeps its rows
    label = rows[0]["measurement"] if rows else ""
    common.publish(rows, out, "attention", COLUMNS,
                   ["provider", "mode", "tokens", "batch", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mem_mb", "status"],
                   title=f"\nmbt_attention on {env['device']} ({label}; {env['dtype']}, H={heads}, D={head_dim}, "
                         f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']})",
                   plot_args=None if args.no_plot else dict(
                       x="batch", y="tflops", series=["provider", "mode"], panels="tokens",
                       title=f"mbt_attention TFLOP/s, {env['device']} ({label}), {env['dtype']}"))
    return rows


def _echo(r: dict) -> None:
    t = f"{r['median_ms']:.3f} ms" if r.get("median_ms") is not None else r["status"]
    print(f"  {r['provider']:10s} {r['mode']:7s} tokens {r['tokens']:>10s} B={r['batch']:<3d} {t}", flush=True)


main = common.main_for(add_arguments, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
