"""``mbt-fast build cuda [--verbose] [--emu]``: compile (or load, when cached) the CUDA extension."""
from __future__ import annotations

import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="compile the CUDA extension (or its CPU emulation) now instead of on first use")
    p.add_argument("target", choices=["cuda"], help="what to build")
    p.add_argument("--emu", action="store_true", help="build the CPU emulation (g++, backend 'cuda-emu') instead of the nvcc extension")
    p.add_argument("--verbose", action="store_true", help="show the compiler output; for nvcc, print the ptxas register/spill lines")
    p.add_argument("--build-dir", default=None, help="build here instead of the TORCH_EXTENSIONS_DIR cache (forces a JIT build)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mbt_fast import cuda_ext

    emulated = bool(args.emu)
    name = "cuda-emu (g++)" if emulated else "cuda (nvcc)"
    problems = cuda_ext.build_problems(emulated)
    if problems:
        print(f"cannot build {name}: " + "; ".join(problems), file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        ops = cuda_ext.build(emulated=emulated, verbose=args.verbose, build_directory=args.build_dir)
    except RuntimeError as e:
        print(f"build of {name} failed:\n{e}", file=sys.stderr)
        return 1
    log = cuda_ext.last_build_log() if args.verbose else ""
    if args.verbose and log:
        if emulated:
            print(log)
        else:
            report = cuda_ext.ptxas_report(log)
            print("\n".join(report) if report else "(no ptxas output: nothing was recompiled)")
            spilled = {k: v for k, v in cuda_ext.spills(log).items() if "attention" in k and v != (0, 0)}
            if spilled:
                print(f"WARNING: attention kernels spill registers: {spilled}", file=sys.stderr)
    print(f"{name} extension ready ({time.perf_counter() - t0:.1f} s): torch.ops.{ops.name}")
    return 0
