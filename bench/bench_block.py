"""One fusion layer of MBT: LN, QKV, attention, out-proj, LN, MLP, residual + bottleneck mean.

Providers: ``reference`` (Scenic's path: per modality ``EncoderBlock`` over ``concat(tokens, bottleneck)``,
split, then ``stack(...).mean``), ``torch`` (``mbt_fast.layers.packed_block`` on the packed buffer, SDPA
attention), ``flex`` / ``flash_attn`` (the torch packed block with its attention swapped for the
providers of ``bench_attention``), ``triton`` and ``cuda`` (``packed_block`` on those backends).
TFLOP/s count the GEMMs (``2 * rows * B * (4C^2 + 2 C mlp)``) and attention (``4*B*H*nq*nk*D`` per
segment), x2 / x2.5 backward; GB/s use the bytes the performance model counts for the fused (triton)
design of this layer, the same for every provider. As in ``bench_attention``: every row names the SDPA
implementation that ran, and on a CPU the providers and modes of one shape are timed round-robin.

    python bench/bench_block.py            # GPU: MBT-B (C=768, 12 heads, mlp 3072, 401+5 / 3137+5 tokens)
    python bench/bench_block.py --quick    # small shapes (the CPU default), CPU measurement
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import bench_attention as ba
from bench import common
from mbt_fast.commands import argtypes

PROVIDERS = ("reference", "torch", "flex", "flash_attn", "triton", "cuda")
MODES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = ["op", "provider", "mode", "tokens", "n_bottleneck", "batch", "hidden", "heads", "mlp_dim", "rows",
           "median_ms", "p20_ms", "p80_ms", "reps", "tflops", "gbps", "peak_mem_mb", "mem_method", "sdpa_backend", "status",
           "note",
           *common.ENV_COLUMNS]


def make_blocks(M: int, C: int, heads: int, mlp: int, device, dtype, seed: int = 0):
    from mbt_fast.layers import EncoderBlock

    torch.manual_seed(seed)
    blocks = [EncoderBlock(C, heads, mlp).to(device=device, dtype=dtype) for _ in range(M)]
    for b in blocks:  # non-trivial LayerNorm affine parameters
        for ln in (b.norm1, b.norm2):
            torch.nn.init.normal_(ln.weight, 1.0, 0.1)
            torch.nn.init.normal_(ln.bias, 0.0, 0.1)
    return blocks


def reference_layer(blocks, xs, bottleneck):
    """Scenic's fusion layer: concat, block, split per modality; the new bottleneck is the mean."""
    outs, bottle = [], []
    for blk, x in zip(blocks, xs):
        t = x.shape[1]
        out = blk(torch.cat([x, bottleneck], dim=1))
        outs.append(out[:, :t])
        bottle.append(out[:, t:])
    return outs, torch.stack(bottle, dim=-1).mean(dim=-1)


def swapped_attention(provider: str, segments, n: int, device, dtype, mode: str, args):
    """A context factory under which the torch packed block's ``ops.mbt_attention`` is a bench_attention
    provider (built once here; entered around every call), and the provider's note."""
    from mbt_fast import ops

    maker = ba.MAKERS[provider]
    fn, note = maker(segments, n, device, dtype, mode, args.flex_compile) if provider == "flex" else \
        maker(segments, n, device, dtype, mode)
    return (lambda: mock.patch.object(ops, "mbt_attention", lambda q, k, v, seg, **kw: fn(q, k, v))), note


def layer_flops(layout, segments, batch, C, heads, mlp) -> float:
    from mbt_fast.perf_model import attention_flops

    gemm = 2.0 * layout.total_rows * batch * (4 * C * C + 2 * C * mlp)
    return gemm, attention_flops(segments, batch, heads, C // heads)


def design_bytes(tokens, nb, batch, C, heads, mlp, dtype) -> tuple[float, float]:
    """HBM bytes of the fused (triton) layer, forward and backward, from the performance model (meta)."""
    from mbt_fast import perf_model
    from mbt_fast.layers import LayerPlan, packed_block

    layout, seg = ba.layout_segments(tokens, nb)
    blocks = make_blocks(len(tokens), C, heads, mlp, "meta", dtype)
    x = torch.empty(layout.total_rows, batch, C, device="meta", dtype=dtype, requires_grad=True)
    fwd, bwd = perf_model.Counter(), perf_model.Counter()
    with perf_model.counting(fwd, "triton"):
        y = packed_block(blocks, x, layout, LayerPlan(seg, "mean"), layout.row_weight("meta"), "triton")
    with perf_model.counting(bwd, "triton"):
        y.backward(torch.empty_like(y))
    return fwd.totals()["hbm_bytes"], bwd.totals()["hbm_bytes"]


def prepare_case(provider, tokens, nb, batch, C, heads, mlp, mode, device, dtype, args) -> dict:
    """The row of one case with ``_run`` (its callable, run once) or a status saying why it cannot run."""
    from mbt_fast.layers import LayerPlan, packed_block

    layout, seg = ba.layout_segments(tokens, nb)
    N = layout.total_rows
    row = {"op": "fusion_layer", "provider": provider, "mode": mode, "tokens": "+".join(map(str, tokens)),
           "n_bottleneck": nb, "batch": batch, "hidden": C, "heads": heads, "mlp_dim": mlp, "rows": N, "note": ""}
    try:
        blocks = make_blocks(len(tokens), C, heads, mlp, device, dtype)
        params = [p for b in blocks for p in b.parameters()]
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(batch, t, C, generator=gen).to(device=device, dtype=dtype) for t in tokens]
        bottleneck = torch.randn(batch, nb, C, generator=gen).to(device=device, dtype=dtype)
        ctx = contextlib.nullcontext
        if provider == "reference":
            inputs = xs + [bottleneck]
            fwd = lambda *a: reference_layer(blocks, a[:-1], a[-1])  # noqa: E731
            row["note"] = "Scenic path: concat/block/split per modality, stack + mean"
        else:
            parts = []
            for x in xs:
                parts += [x.transpose(0, 1), bottleneck.transpose(0, 1)]
            inputs = [torch.cat(parts).contiguous()]
            backend = provider if provider in ("triton", "cuda") else "torch"
            if provider in ("triton", "cuda"):
                from mbt_fast.backends import unavailable_reasons
                reasons = unavailable_reasons(provider, device)
                if reasons:
                    raise ba.Unavailable("; ".join(reasons))
                row["note"] = f"packed_block, {provider} backend"
            elif provider != "torch":
                ctx, note = swapped_attention(provider, seg, N, device, dtype, mode, args)
                row["note"] = "packed_block (torch) + " + note
            else:
                row["note"] = "packed_block, torch backend (SDPA per segment)"
            plan, rw = LayerPlan(seg, "mean"), layout.row_weight(device)
            fwd = lambda x: packed_block(blocks, x, layout, plan, rw, backend)  # noqa: E731
        with ctx():
            run = _prepare(fwd, inputs, params, mode)

        def timed():
            with ctx():
                return run()
        timed()  # first call: compilation, lazy init
        row["sdpa_backend"] = common.sdpa_backends(timed)
        mem, row["mem_method"] = common.peak_memory(timed, device)
    except ba.Unavailable as e:
        return {**row, **common.unavailable_row(f"unavailable: {e}")}
    except Exception as e:  # noqa: BLE001
        return {**row, **common.unavailable_row(f"error: {common.short_error(e)}")}
    return {**row, "peak_mem_mb": mem, "status": "ok", "_run": timed, "_flops": layer_flops(layout, seg, batch, C, heads, mlp)}


def finish_case(row: dict, t: dict, nbytes) -> dict:
    """Add the timing ``t`` and the TFLOP/s and GB/s it gives."""
    gemm, attn = row.pop("_flops")
    mode = row["mode"]
    flops = {"fwd": gemm + attn, "bwd": 2 * gemm + 2.5 * attn, "fwd+bwd": 3 * gemm + 3.5 * attn}[mode]
    b = {"fwd": nbytes[0], "bwd": nbytes[1], "fwd+bwd": sum(nbytes)}[mode]
    s = t["median_ms"] * 1e-3
    return {**row, **t, "tflops": flops / s / 1e12, "gbps": b / s / 1e9}


def bench_shape(tokens, nb, batch, C, heads, mlp, device, dtype, args) -> list[dict]:
    """Every (mode, provider) of one shape, timed together (``common.time_cases``: round-robin on a CPU)."""
    nbytes = design_bytes(tokens, nb, batch, C, heads, mlp, dtype)
    rows = [prepare_case(p, tokens, nb, batch, C, heads, mlp, m, device, dtype, args)
            for m in args.modes for p in args.providers]
    timings = common.time_cases(rows, device, args.warmup, args.reps)
    return [finish_case(r, timings[i], nbytes) if i in timings else r for i, r in enumerate(rows)]


def _flat(out):
    return list(out[0]) + [out[1]] if isinstance(out, tuple) else [out]


def _prepare(fwd, inputs, params, mode):
    """The callable a repetition runs: the forward under ``no_grad``, the backward of a kept graph, or both."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd(*inputs)
        return run
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    wrt = leaves + params
    outs = _flat(fwd(*leaves))
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True)
    return lambda: torch.autograd.grad(_flat(fwd(*leaves)), wrt, grads)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=sorted(common.DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--tokens", type=ba._tokens, nargs="+", default=None)
    ap.add_argument("--batch", type=argtypes.positive_int, nargs="+", default=None)
    ap.add_argument("--hidden", type=argtypes.positive_int, default=None)
    ap.add_argument("--heads", type=argtypes.positive_int, default=None)
    ap.add_argument("--mlp-dim", type=argtypes.positive_int, default=None)
    ap.add_argument("--n-bottleneck", type=argtypes.nonneg_int, default=5)
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--quick", action="store_true", help="small shapes (the default on a CPU)")
    ap.add_argument("--interpreter", action="store_true", help="CPU: triton under TRITON_INTERPRET=1 (labelled)")
    ap.add_argument("--flex-compile", action="store_true")
    ap.add_argument("--warmup", type=argtypes.nonneg_int, default=None)
    ap.add_argument("--reps", type=argtypes.positive_int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plot", action="store_true")
    common.add_threads_argument(ap)


def run(args) -> list[dict]:
    common.pin_threads(args.threads)
    common.set_interpreter(args.interpreter)
    device = common.pick_device(args.device)
    quick = args.quick or device.type == "cpu"
    dtype = common.DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    if quick:
        tokens, batches = args.tokens or [(17, 33), (33, 97)], args.batch or [1, 2]
        C, heads, mlp = args.hidden or 64, args.heads or 2, args.mlp_dim or 256
        args.warmup = 2 if args.warmup is None else args.warmup
        args.reps = args.reps or 7
    else:
        tokens, batches = args.tokens or [(401, 3137), (101, 401), (401, 1569)], args.batch or [1, 2, 4, 8]
        C, heads, mlp = args.hidden or 768, args.heads or 12, args.mlp_dim or 3072
        args.warmup = 5 if args.warmup is None else args.warmup
        args.reps = args.reps or 20
    env = common.env_row(device, dtype)
    out = common.out_dir(device, args.out)
    rows = []
    interp = common.env_row(device, dtype, interpreter=True) if device.type == "cpu" else {}
    for tok in tokens:
        for b in batches:
            for r in bench_shape(tok, args.n_bottleneck, b, C, heads, mlp, device, dtype, args):
                rows.append({**env, **r, **(interp if r["provider"] == "triton" and r["status"] == "ok" else {})})
                ba._echo(rows[-1])
            common.write_csv(rows, out / "block.csv", COLUMNS)  # a run killed at its time budget keeps its rows
    label = rows[0]["measurement"] if rows else ""
    common.publish(rows, out, "block", COLUMNS,
                   ["provider", "mode", "tokens", "batch", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_mem_mb",
                    "sdpa_backend", "status"],
                   title=f"\nfusion layer on {env['device']} ({label}; {env['dtype']}, C={C}, H={heads}, mlp={mlp}, "
                         f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']})",
                   plot_args=None if args.no_plot else dict(
                       x="batch", y="median_ms", series=["provider", "mode"], panels="tokens",
                       title=f"fusion layer time (ms), {env['device']} ({label}), {env['dtype']}"))
    return rows


main = common.main_for(add_arguments, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
