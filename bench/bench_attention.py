"""Multimodal bottleneck attention: every provider on the packed layout of a fusion layer.

Each modality's queries (its tokens and its bottleneck copy) attend to ``[modality | bottleneck]``
(``PackedLayout.attn_segments(fused=True)``); q, k, v are token-major ``[N, B, H, D]``.

Providers: ``eager`` (masked full N x N attention in PyTorch), ``sdpa`` (the torch backend: one SDPA
call per segment, SDPA choosing its implementation), ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient``
(the same with SDPA held to one implementation), ``flex`` (FlexAttention with a document mask;
compiled on a GPU, eager on a CPU), ``flash_attn`` (``flash_attn_varlen_func``, if installed; includes the [N,B]<->[B,N] transposes its
varlen layout needs), ``triton`` and ``cuda`` (the mbt_fast backends). A provider that cannot run is
reported as ``unavailable: why``. TFLOP/s use ``4*B*H*nq*nk*D`` per segment (x2.5 backward, x3.5
fwd+bwd); GB/s use the flash-style minimum traffic of ``mbt_fast.perf_model.attention_cost`` (q, k, v,
out, LSE once), the same for every provider. Every row names the SDPA implementation that ran
(``sdpa_backend``, from the profiler). On a CPU the providers and modes of one shape are timed
round-robin; on a GPU with CUDA events, the L2 flushed before each repetition.

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

PROVIDERS = ("eager", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn", "triton",
             "triton_autotune", "cuda")
SDPA_FORCED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
MODES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = ["op", "provider", "mode", "tokens", "n_bottleneck", "batch", "heads", "head_dim", "rows", "median_ms",
           "p20_ms", "p80_ms", "reps", "tflops", "gbps", "peak_mem_mb", "mem_method", "sdpa_backend", "status", "note",
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


def make_sdpa_forced(kind: str):
    """The torch backend with SDPA held to one implementation (``torch.nn.attention.sdpa_kernel``); one
    that cannot take these inputs here is unavailable, with torch's reason."""
    def make(segments, n, device, dtype, mode):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from mbt_fast import ops

        impl = getattr(SDPBackend, kind)

        def fn(q, k, v):
            try:
                with sdpa_kernel(impl):
                    return ops.mbt_attention(q, k, v, segments, backend="torch")
            except RuntimeError as e:
                if any(m in str(e) for m in ("No available kernel", "No viable backend", "not supported")):
                    raise Unavailable(f"SDPA {kind} cannot run these inputs on {device.type}: {common.short_error(e, 120)}")
                raise
        return fn, f"torch backend, SDPA forced to {kind}"
    return make


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

    cu_by_batch = {}  # built on the first (untimed) call of a batch size, so no host work or H2D copy is timed

    def fn(q, k, v):
        N, B, H, D = q.shape
        # varlen packs whole sequences: [N, B] -> [B, N] (copies), one sequence per (sample, segment)
        if B not in cu_by_batch:
            cu_by_batch[B] = torch.tensor([0] + [b * N + s for b in range(B) for s in _cumsum(lens)], dtype=torch.int32,
                                          device=q.device)
        cu = cu_by_batch[B]
        qv, kv, vv = (t.transpose(0, 1).reshape(B * N, H, D) for t in (q, k, v))
        o = flash_attn_varlen_func(qv, kv, vv, cu, cu, max(lens), max(lens))
        return o.view(B, N, H, D).transpose(0, 1)
    return fn, "flash_attn_varlen_func, with [N,B]<->[B,N] copies; cu_seqlens precomputed"


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


def make_triton_autotune(segments, n, device, dtype, mode):
    """The triton backend with every tile candidate timed once per shape (``MBT_FAST_AUTOTUNE``): the
    tuning runs here, outside the timed region, and the note names the winners."""
    from mbt_fast.kernels import attention

    fn, _ = make_backend("triton")(segments, n, device, dtype, mode)
    if device.type == "cpu":
        raise Unavailable("autotuning times candidates on a GPU; the interpreter runs its own small tiles")
    rows = segments.tolist() if isinstance(segments, torch.Tensor) else segments
    seg = tuple(sorted(tuple(int(x) for x in row) for row in rows))  # the table as the op keys it

    def tuned(q, k, v):
        with attention.autotune():
            return fn(q, k, v)

    def note(batch):
        return "triton backend, autotuned: " + ", ".join(f"{k} {t}" for k, t in attention.tuned_tiles(seg, batch).items())
    return tuned, note


MAKERS = {"eager": make_eager, "sdpa": make_sdpa, **{p: make_sdpa_forced(k) for p, k in SDPA_FORCED.items()},
          "flex": make_flex, "flash_attn": make_flash_attn, "triton": make_backend("triton"),
          "triton_autotune": make_triton_autotune, "cuda": make_backend("cuda")}


# ---- one measurement ----------------------------------------------------------------------------------
def prepare(fn, q, k, v, mode: str):
    """The callable a repetition runs: the forward under ``no_grad``, the backward of a kept graph, or both."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v)
        return run
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    g = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, leaves, g, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, g)


def prepare_case(provider, tokens, nb, batch, heads, head_dim, mode, device, dtype, args) -> dict:
    """The row of one case with ``_run`` (its callable, run once) or a status saying why it cannot run."""
    layout, seg = layout_segments(tokens, nb)
    n = layout.total_rows
    row = {"op": "mbt_attention", "provider": provider, "mode": mode, "tokens": "+".join(map(str, tokens)),
           "n_bottleneck": nb, "batch": batch, "heads": heads, "head_dim": head_dim, "rows": n, "note": "",
           "_segments": seg}
    try:
        maker = MAKERS[provider]
        fn, note = maker(seg, n, device, dtype, mode, args.flex_compile) if provider == "flex" else \
            maker(seg, n, device, dtype, mode)
        row["note"] = note
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(n, batch, heads, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        run = prepare(fn, q, k, v, mode)
        run()  # first call: compilation, lazy init, autotuning, and any Unavailable from inside
        if callable(note):  # a note that names what the first call chose
            row["note"] = note(batch)
        row["sdpa_backend"] = common.sdpa_backends(run)
        mem, row["mem_method"] = common.peak_memory(run, device)
    except Unavailable as e:
        return {**row, **common.unavailable_row(f"unavailable: {e}")}
    except Exception as e:  # noqa: BLE001  (a benchmark reports a failing provider and goes on)
        return {**row, **common.unavailable_row(f"error: {common.short_error(e)}")}
    return {**row, "peak_mem_mb": mem, "status": "ok", "_run": run}


def finish_case(row: dict, t: dict, dtype) -> dict:
    """Add the timing ``t`` and the TFLOP/s and GB/s it gives."""
    from mbt_fast.perf_model import attention_cost, attention_flops

    seg, b, h, d = row["_segments"], row["batch"], row["heads"], row["head_dim"]
    fl = attention_flops(seg, b, h, d)
    es = torch.empty((), dtype=dtype).element_size()
    fwd_b = attention_cost(seg, b, h, d, es, "fwd").bytes
    bwd_b = attention_cost(seg, b, h, d, es, "bwd").bytes
    flops = {"fwd": fl, "bwd": 2.5 * fl, "fwd+bwd": 3.5 * fl}[row["mode"]]
    nbytes = {"fwd": fwd_b, "bwd": bwd_b, "fwd+bwd": fwd_b + bwd_b}[row["mode"]]
    s = t["median_ms"] * 1e-3
    return {**row, **t, "tflops": flops / s / 1e12, "gbps": nbytes / s / 1e9}


def bench_shape(tokens, nb, batch, heads, head_dim, device, dtype, args) -> list[dict]:
    """Every (mode, provider) of one shape, timed together (``common.time_cases``: round-robin on a CPU)."""
    rows = [prepare_case(p, tokens, nb, batch, heads, head_dim, m, device, dtype, args)
            for m in args.modes for p in args.providers]
    timings = common.time_cases(rows, device, args.warmup, args.reps)
    rows = [finish_case(r, timings[i], dtype) if i in timings else r for i, r in enumerate(rows)]
    for r in rows:
        r.pop("_segments")
    return rows


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
        warmup, reps = args.warmup if args.warmup is not None else 2, args.reps or 7
    else:
        tokens = args.tokens or [(401, 3137), (101, 401), (401, 1569), (801, 6273)]
        batches = args.batch or [1, 2, 4, 8]
        heads, head_dim = args.heads or 12, args.head_dim or 64
        warmup, reps = args.warmup if args.warmup is not None else 5, args.reps or 30
    args.warmup, args.reps = warmup, reps
    env = common.env_row(device, dtype)
    out = common.out_dir(device, args.out)
    rows = []
    interp = common.env_row(device, dtype, interpreter=True) if device.type == "cpu" else {}
    for tok in tokens:
        for b in batches:
            for r in bench_shape(tok, args.n_bottleneck, b, heads, head_dim, device, dtype, args):
                rows.append({**env, **r, **(interp if r["provider"] == "triton" and r["status"] == "ok" else {})})
                _echo(rows[-1])
            common.write_csv(rows, out / "attention.csv", COLUMNS)  # a run killed at its time budget keeps its rows
    label = rows[0]["measurement"] if rows else ""
    common.publish(rows, out, "attention", COLUMNS,
                   ["provider", "mode", "tokens", "batch", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mem_mb",
                    "sdpa_backend", "status"],
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
