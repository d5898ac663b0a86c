"""Shared helpers of the benchmark scripts: environment rows, timing, peak memory, CSV, table, plot.

Every CSV row carries the device, torch/triton versions, git commit, dtype and a ``measurement`` label
("GPU measurement", "CPU measurement" or "interpreter"), so a number never travels without its context.
"""
from __future__ import annotations

import argparse

import csv
import gc
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mbt_fast.commands import argtypes

# the profiler (sdpa_backends, bench_profile) would print two kineto lines per use into every log; read at
# its first use, so setting it here, before any, is in time (a user's own setting wins)
os.environ.setdefault("KINETO_LOG_LEVEL", "99")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ENV_COLUMNS = ["device", "measurement", "threads", "torch", "triton", "commit", "dtype"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "mbt_fast", "kernels", "csrc"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    """Folder name under bench/results/: the GPU name as a slug, or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")


def env_row(device: torch.device, dtype: torch.dtype, interpreter: bool = False) -> dict:
    label = "interpreter" if interpreter else ("GPU measurement" if device.type == "cuda" else "CPU measurement")
    return {"device": device_name(device), "measurement": label,
            "threads": torch.get_num_threads() if device.type == "cpu" else "", "torch": torch.__version__,
            "triton": version("triton"), "commit": git_commit(), "dtype": str(dtype).replace("torch.", "")}


def add_threads_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=argtypes.positive_int, default=None,
                    help="CPU: intra-op threads, pinned for the whole run and recorded in every row "
                         "(default: the cores this process may use)")


def pin_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count for the run (a CPU timing depends on it) and return it."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- timing -----------------------------------------------------------------------------------------
def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


L2_FLUSH_BYTES = 256 * 2**20  # above any GPU's L2 (H100/H200: 50 MB, B200: 126 MB)
_flush_buffers: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 by writing a buffer larger than it, so that a repetition does not find the last
    one's inputs cached (a training step never does). No-op on a CPU."""
    if device.type != "cuda":
        return
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    _flush_buffers[key].zero_()


def time_fn(fn, device: torch.device, warmup: int = 3, reps: int = 10, max_seconds: float = 5.0) -> dict:
    """Median, p20 and p80 of ``fn()`` in ms: CUDA events on a GPU (L2 flushed before each repetition,
    outside the events), ``time.perf_counter`` on a CPU.

    Warmup runs are discarded; at least 3 timed runs, fewer than ``reps`` if ``max_seconds`` runs out.
    """
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    for i in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush_l2(device)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if i >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8),
            "reps": len(times)}


def time_interleaved(fns: dict, device: torch.device, warmup: int = 1, reps: int = 10) -> dict:
    """``time_fn`` for several functions run round-robin, one call each per round, so that a busy
    machine slows them alike (their ratio is what a CPU run can tell)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if device.type == "cuda":
                flush_l2(device)
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: {"median_ms": statistics.median(v), "p20_ms": _quantile(v, 0.2), "p80_ms": _quantile(v, 0.8),
                "reps": len(v)} for k, v in times.items()}


def time_cases(rows: list[dict], device: torch.device, warmup: int, reps: int) -> dict:
    """Time every row's ``_run`` callable (popped from the row): round-robin on a CPU (``time_interleaved``),
    so that neither a slow first case nor load from other processes lands on one of them; on a GPU each on
    its own with CUDA events (``time_fn``). Returns ``{row index: timing}``."""
    runs = {i: r.pop("_run") for i, r in enumerate(rows) if "_run" in r}
    if device.type == "cpu":
        return time_interleaved(runs, device, warmup, reps)
    return {i: time_fn(run, device, warmup, reps) for i, run in runs.items()}


_SDPA_KERNEL = re.compile(r"_scaled_dot_product_(flash_attention_for_cpu|flash_attention|efficient_attention|"
                          r"cudnn_attention|fused_attention_overrideable|attention_math)")
_SDPA_SHORT = {"flash_attention_for_cpu": "flash (CPU)", "flash_attention": "flash", "efficient_attention": "efficient",
               "cudnn_attention": "cudnn", "fused_attention_overrideable": "overrideable", "attention_math": "math"}


def sdpa_backends(fn) -> str:
    """Which SDPA implementation(s) one ``fn()`` actually ran, read from the aten ops the profiler saw
    (``flash``, ``efficient``, ``cudnn``, ``math``, ...), ``none`` if it called no SDPA."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = {_SDPA_SHORT[m.group(1)] for e in prof.key_averages() if (m := _SDPA_KERNEL.search(e.key))}
    return "+".join(sorted(found)) or "none"


def peak_memory(fn, device: torch.device) -> tuple[float | None, str]:
    """Peak allocated MB during one ``fn()`` and how it was measured (CPU: not measured, said so)."""
    if device.type != "cuda":
        return None, "n/a (CPU: torch's allocator is invisible to tracemalloc)"
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated - before"


def unavailable_row(status: str) -> dict:
    return {"median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0, "status": status}


def short_error(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}"


# ---- output -----------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path, columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell(r.get(c)) for c in columns})
    return path


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    if title:
        print(title)
    cells = [[str(_cell(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))


def plot(rows: list[dict], path: Path, x: str, y: str, series: list[str], title: str, panels: str | None = None) -> Path | None:
    """One line per ``series`` key tuple, one panel per value of ``panels``; rows without ``y`` skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get(y) is not None]
    if not ok:
        return None
    panel_keys = sorted({r[panels] for r in ok}, key=str) if panels else [None]
    fig, axes = plt.subplots(1, len(panel_keys), figsize=(5 * len(panel_keys), 4), squeeze=False)
    for ax, pk in zip(axes[0], panel_keys):
        sub = [r for r in ok if panels is None or r[panels] == pk]
        for key in sorted({tuple(r[s] for s in series) for r in sub}, key=str):
            pts = sorted(((r[x], r[y]) for r in sub if tuple(r[s] for s in series) == key), key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="/".join(map(str, key)))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{panels}={pk}" if panels else "")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def out_dir(device: torch.device, override: str | None = None) -> Path:
    return Path(override) if override else RESULTS / device_slug(device)


def set_interpreter(enabled: bool) -> None:
    """Turn the Triton interpreter on for this run. Triton reads TRITON_INTERPRET when a function is
    decorated, and ``import torch`` has already imported Triton (its own ``tl`` helpers are jit functions),
    so a process started without it restarts itself with it set: same interpreter, same arguments."""
    if not enabled or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        if "pytest" in sys.modules:  # never replace a test process
            raise RuntimeError("--interpreter: set TRITON_INTERPRET=1 before Triton is imported (tests: conftest.py)")
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # keeps "-m module"


def publish(rows: list[dict], out: Path, stem: str, columns: list[str], table_columns: list[str], title: str,
            plot_args: dict | None) -> Path:
    """Write ``out/<stem>.csv``, print the table, and (``plot_args`` given) save ``out/<stem>.png``."""
    path = write_csv(rows, out / f"{stem}.csv", columns)
    print_table(rows, table_columns, title=title)
    print(f"wrote {path}")
    if plot_args is not None:
        png = plot(rows, out / f"{stem}.png", **plot_args)
        if png:
            print(f"wrote {png}")
    return path


def main_for(add_arguments, run, doc: str):
    """The ``main(argv)`` of a benchmark script: parse its arguments and run it."""
    def main(argv=None) -> int:
        ap = argparse.ArgumentParser(description=doc.splitlines()[0])
        add_arguments(ap)
        run(ap.parse_args(argv))
        return 0
    return main
