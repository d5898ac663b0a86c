"""One MBT training step per backend: forward, per-modality cross-entropy, backward, SGD(momentum) step
(``--mode eval``: the inference forward instead, ``model.eval()`` under ``torch.no_grad()``).

Backends ``reference``, ``eager_sdpa`` (the baseline a user would write: Scenic's structure with SDPA),
``torch``, ``triton``, ``cuda``, each eager and under ``torch.compile`` (compile
failures are caught and reported). On a GPU the step runs under bf16 autocast; on a CPU in fp32, with
the ``tiny`` preset and a mid-size config (``torch.compile`` on a CPU only with ``--compile``: its C++
build takes minutes; the CPU rows of a preset are timed round-robin, so that load from other processes
slows them alike and their ratio stays meaningful). Reports step time (median, p20, p80), samples/s, peak memory and the speedup of
each row over the eager ``reference``, ``eager_sdpa`` and ``torch`` steps.

    python bench/bench_train.py                            # GPU: mbt_base_16x2, batch 8; CPU: tiny + mid
    python bench/bench_train.py --preset tiny --batch 4    # any preset
    python bench/bench_train.py --preset mbt_base_16x2 --batch 1 --mode eval --backends eager_sdpa torch --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench import common
from mbt_fast.commands import argtypes

BACKENDS = ("reference", "eager_sdpa", "torch", "triton", "cuda")
COLUMNS = ["op", "preset", "backend", "compile", "batch", "amp", "median_ms", "p20_ms", "p80_ms", "reps",
           "samples_per_s", "peak_mem_mb", "mem_method", "speedup_vs_reference", "speedup_vs_eager_sdpa", "speedup_vs_torch",
           "sdpa_backend", "status",
           *common.ENV_COLUMNS]


def config(name: str):
    """A preset, or ``mid``: a CPU-sized model with head dim 64 (65 + 65 tokens, 4 layers, C=192)."""
    from mbt_fast.config import MBTConfig

    if name == "mid":
        return MBTConfig(hidden_size=192, num_heads=3, mlp_dim=768, num_layers=4, fusion_layer=2, n_bottlenecks=4,
                         num_classes=32, input_shapes={"rgb": (-1, 8, 64, 64, 3), "spectrogram": (-1, 256, 64, 3)})
    return MBTConfig.preset(name)


def make_batch(cfg, batch: int, device, seed: int = 0):
    from mbt_fast.modalities import scenic_order

    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for m in scenic_order(cfg.modality_fusion):  # rgb in [-1, 1], the others standard normal
        shape = (batch, *cfg.input_shape(m))
        x = torch.rand(shape, generator=g) * 2 - 1 if m == "rgb" else torch.randn(shape, generator=g)
        inputs[m] = x.to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    return inputs, labels


def make_step(cfg, backend: str, batch: int, device, amp: bool, compile_: bool, mode: str = "train"):
    from mbt_fast.model import MBT

    torch.manual_seed(0)
    model = MBT(cfg, backend=backend).to(device).train(mode == "train")
    if mode == "eval":
        inputs, _ = make_batch(cfg, batch, device)

        def forward(inputs):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return model(**inputs)

        fn = torch.compile(forward) if compile_ else forward
        return lambda: fn(inputs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs, labels = make_batch(cfg, batch, device)

    def loss_fn(inputs, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model.forward_per_modality(**inputs)
            return sum(F.cross_entropy(v.float(), labels) for v in logits.values()) / len(logits)

    fn = torch.compile(loss_fn) if compile_ else loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fn(inputs, labels)
        loss.backward()
        opt.step()
        return loss
    return step


def bench_one(preset, cfg, backend, compile_, batch, device, args) -> dict:
    amp = device.type == "cuda"
    row = {"op": "train_step" if args.mode == "train" else "eval_forward", "preset": preset, "backend": backend,
           "compile": compile_, "batch": batch,
           "amp": "bf16 autocast" if amp else "none (fp32)"}
    from mbt_fast.backends import unavailable_reasons

    reasons = unavailable_reasons(backend, device)
    if reasons:
        return {**row, **common.unavailable_row("unavailable: " + "; ".join(reasons))}
    if compile_ and device.type == "cpu" and not args.compile:
        return {**row, **common.unavailable_row("skipped: torch.compile on a CPU builds C++ for minutes (pass --compile)")}
    try:
        step = make_step(cfg, backend, batch, device, amp, compile_, args.mode)
        step()  # first call: compilation, lazy init
        row["sdpa_backend"] = common.sdpa_backends(step)
        if device.type == "cpu":  # timed later, interleaved with the other CPU rows (see run)
            return {**row, "status": "ok", "_step": step, "mem_method": common.peak_memory(step, device)[1]}
        t = common.time_fn(step, device, args.warmup, args.reps, max_seconds=args.max_seconds)
        mem, how = common.peak_memory(step, device)
    except Exception as e:  # noqa: BLE001  (report, e.g., a torch.compile failure, and go on)
        return {**row, **common.unavailable_row(f"error: {common.short_error(e, 240)}")}
    return {**row, **t, "samples_per_s": batch / (t["median_ms"] * 1e-3), "peak_mem_mb": mem, "mem_method": how,
            "status": "ok"}


def add_speedups(rows: list[dict]) -> None:
    """Speedup of each row over the eager reference, eager_sdpa and torch steps of the same preset and batch."""
    for r in rows:
        for base in ("reference", "eager_sdpa", "torch"):
            b = next((x for x in rows if x["preset"] == r["preset"] and x["batch"] == r["batch"]
                      and x["backend"] == base and not x["compile"] and x.get("median_ms")), None)
            if b and r.get("median_ms"):
                r[f"speedup_vs_{base}"] = b["median_ms"] / r["median_ms"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None)
    ap.add_argument("--preset", nargs="+", default=None, help="presets (or 'mid'); GPU default mbt_base_16x2, CPU tiny mid")
    ap.add_argument("--batch", type=argtypes.positive_int, nargs="+", default=None, help="GPU default 8, CPU default 4")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--mode", choices=("train", "eval"), default="train",
                    help="train: a training step (default); eval: the inference forward")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile", action="store_true", help="CPU: also run the torch.compile rows")
    ap.add_argument("--compile-backends", nargs="+", choices=BACKENDS, default=None,
                    help="the backends with a torch.compile row (default: every one of --backends)")
    ap.add_argument("--interpreter", action="store_true", help="CPU: triton under TRITON_INTERPRET=1 (labelled)")
    ap.add_argument("--quick", action="store_true", help="CPU-sized defaults (the default on a CPU)")
    ap.add_argument("--warmup", type=argtypes.nonneg_int, default=None)
    ap.add_argument("--reps", type=argtypes.positive_int, default=None)
    ap.add_argument("--max-seconds", type=argtypes.positive_float, default=20.0, help="stop timing a row after this long (>= 3 reps)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plot", action="store_true")
    common.add_threads_argument(ap)


def run(args) -> list[dict]:
    common.set_interpreter(args.interpreter)
    common.pin_threads(args.threads)
    device = common.pick_device(args.device)
    cpu = device.type == "cpu" or args.quick
    presets = args.preset or (["tiny", "mid"] if cpu else ["mbt_base_16x2"])
    batches = args.batch or ([4] if cpu else [8])
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.reps = args.reps or (10 if cpu else 20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = common.out_dir(device, args.out)
    stem = "train" if args.mode == "train" else "eval"  # train.csv / eval.csv
    rows = []
    cfgs = {p: config(p) for p in presets}
    # every eager row first, then the compiled ones: compiling is the slow part, and a run stopped at its
    # time budget (``mbt-fast bench gpu``) should still have every backend's eager step at every batch
    for compile_ in ((False,) if args.no_compile else (False, True)):
        for preset, batch in ((p, b) for p in presets for b in batches):
            for backend in args.backends:
                if compile_ and args.compile_backends is not None and backend not in args.compile_backends:
                    continue
                r = bench_one(preset, cfgs[preset], backend, compile_, batch, device, args)
                interp = backend == "triton" and device.type == "cpu"
                rows.append({**common.env_row(device, dtype, interpreter=interp), **r})
                t = f"{r['median_ms']:.2f} ms" if r.get("median_ms") else r["status"]
                print(f"  {preset:14s} {backend:10s} compile={str(compile_):5s} B={batch}: {t}", flush=True)
                if device.type == "cuda":  # a run killed at its time budget keeps the rows it finished
                    common.write_csv(rows, out / f"{stem}.csv", COLUMNS)
    # CPU: the steps of one preset and batch run round-robin, so load from other processes hits them alike
    for preset, batch in ((p, b) for p in presets for b in batches):
        pending = {i: r.pop("_step") for i, r in enumerate(rows)
                   if "_step" in r and r["preset"] == preset and r["batch"] == batch}
        if pending:
            for i, t in common.time_interleaved(pending, device, args.warmup, args.reps).items():
                rows[i].update(t, samples_per_s=batch / (t["median_ms"] * 1e-3))
                print(f"  {preset:14s} {rows[i]['backend']:10s} compile={str(rows[i]['compile']):5s} B={batch}: "
                      f"{t['median_ms']:.2f} ms (interleaved)", flush=True)
            del pending  # free this group's models before the next one is timed
    add_speedups(rows)
    env = rows[0] if rows else common.env_row(device, dtype)
    for r in rows:
        r["label"] = f"{r['backend']}{'+compile' if r['compile'] else ''}"
    what = "training step" if args.mode == "train" else "eval forward"
    common.publish(rows, out, stem, COLUMNS,
                   ["preset", "backend", "compile", "batch", "median_ms", "p20_ms", "p80_ms", "samples_per_s",
                    "peak_mem_mb", "speedup_vs_reference", "speedup_vs_eager_sdpa", "speedup_vs_torch", "sdpa_backend",
                    "status"],
                   title=f"\n{what} on {env['device']} ({env['measurement']}; {env['dtype']}, "
                         f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']})",
                   plot_args=None if args.no_plot else dict(
                       x="batch", y="samples_per_s", series=["label"], panels="preset",
                       title=f"{what} samples/s, {env['device']} ({env['measurement']})"))
    return rows


main = common.main_for(add_arguments, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
