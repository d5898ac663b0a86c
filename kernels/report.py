"""Static performance report: every Triton kernel compiled ahead of time for sm_80 / sm_90, no GPU needed.

    python -m mbt_fast.kernels.report [--json] [--arch 80 90] [--dtype fp16 bf16] [--candidates] [--out DIR]

For each kernel's ``aot_specs(dtype)`` (the MBT-B configuration, GPU block sizes) this runs
``triton.compile`` for the target and reads back, per kernel, arch and dtype:

* ``tile`` and ``config``: the attention kernels' tile (block rows x columns, warps, stages) of the
  architecture's table, and its index in the autotune list (0: the static pick; ``--candidates``
  compiles every candidate);
* ``registers``: registers per thread, from ``cuobjdump -res-usage`` on the cubin;
* ``spill_bytes``: per-thread local memory plus stack frame from the same line (Triton kernels keep no
  local arrays, so anything here is register spilling);
* ``shared_bytes``: static + dynamic shared memory from the compile metadata;
* ``mma_instructions``: tensor-core instructions in the SASS (``nvdisasm``): HMMA, plus HGMMA on sm_90;
* ``sass``: static counts of the opcodes that tell a kernel's design apart (tensor-core MMAs, cp.async
  ``LDGSTS`` and TMA ``UTMALDG`` loads, ``LDSM``, selects, the FP32 arithmetic of the softmax, ``MUFU.EX2``,
  barriers), over the whole kernel (prologue and epilogue included, loops counted once);
* ``loop_sass``: the same counts over the main loop alone (``sass_counts``): what each main-loop
  iteration executes, the number that a masked tail peeled out of the loop changes;
* ``ex2_under_wgmma``: the main loop's ``MUFU.EX2`` issued while a wgmma is in flight: how much of the
  softmax overlaps a tensor-core MMA on sm_90;
* ``ctas_per_sm`` and ``occupancy_limiter``: how many CTAs of the kernel fit on one SM by registers,
  shared memory and warps (``occupancy``), the arithmetic of CUDA's occupancy calculator.

Attention rows are compiled at every head dim in ``--head-dim`` (default 64, MBT-B's); the row-wise
kernels have none (``head_dim`` null). These are static counts from the compiler, not measurements:
no GPU runs here.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

# op modules in report order; attention is written separately and may be absent
OPS = ("attention", "residual_mean", "segment_layernorm", "residual_mean_layernorm", "bias_gelu")
KEYS = ("kernel", "direction", "arch", "dtype", "head_dim", "tile", "config", "num_warps", "registers",
        "spill_bytes", "shared_bytes",
        "ctas_per_sm", "occupancy_limiter", "mma_instructions", "sass", "loop_sass", "ex2_under_wgmma")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# counted in the SASS: mnemonic (before the first '.') except where the suffix is the point (MUFU.EX2)
SASS_OPCODES = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDSM", "LDG", "STG", "FSEL", "FMUL", "FADD", "FFMA",
                "MUFU.EX2", "BAR")
# per-SM limits (CUDA occupancy calculator, compute capability 8.0 and 9.0): registers, register
# allocation unit per warp, warps, CTAs, shared memory at the largest carve-out, shared memory the
# runtime reserves per CTA
_SM_LIMITS = {80: dict(registers=65536, reg_unit=256, warps=64, ctas=32, shared=167936, shared_reserved=1024),
              90: dict(registers=65536, reg_unit=256, warps=64, ctas=32, shared=233472, shared_reserved=1024)}


def _tool(name: str) -> str:
    """The CUDA binary tool ``name``: the one bundled with the triton wheel, else the CUDA toolkit's."""
    import triton

    candidates = []
    try:
        candidates.append(getattr(triton.knobs.nvidia, name).path)
    except Exception:  # older triton without knobs: fall through to the usual places
        pass
    candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates += [os.path.join(cuda_home, "bin", name), shutil.which(name)]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"{name}: not found in the triton wheel (triton/backends/nvidia/bin) nor in {cuda_home}/bin nor on PATH")


def load_specs(dtype: str, ops=OPS, head_dims=(64,), arch: int = 90, candidates: bool = False) -> tuple[list[dict], list[str]]:
    """All ``aot_specs`` of ``ops`` for ``dtype`` (those taking ``head_dim`` once per head dim, the spec
    marked with it; those taking ``arch`` with that architecture's tiles, and every autotune candidate
    with ``candidates``), and a note for every op module that is missing."""
    specs, notes = [], []
    for op in ops:
        try:
            module = importlib.import_module(f"mbt_fast.kernels.{op}")
        except ModuleNotFoundError as e:
            if e.name != f"mbt_fast.kernels.{op}":
                raise
            notes.append(f"{op}: kernels/{op}.py does not exist yet; its kernels are not in this report")
            continue
        if not hasattr(module, "aot_specs"):
            notes.append(f"{op}: kernels/{op}.py defines no aot_specs(dtype); its kernels are not in this report")
            continue
        params = inspect.signature(module.aot_specs).parameters
        kwargs = {"arch": arch, "candidates": candidates} if "arch" in params else {}
        if "head_dim" in params:
            specs += [dict(spec, head_dim=d) for d in head_dims
                      for spec in module.aot_specs(_DTYPES[dtype], head_dim=d, **kwargs)]
        else:
            specs += module.aot_specs(_DTYPES[dtype], **kwargs)
    return specs, notes


def _source(spec: dict):
    """``ASTSource`` for a spec: the signature in argument order with constexprs marked, and the spec's
    ``attrs`` or else the 16-byte alignment the JIT would assume for torch allocations (every pointer)
    and for the ints listed in ``divisible_by_16``."""
    from triton.compiler import ASTSource

    fn = spec["fn"]
    sig = dict(spec["signature"])
    sig.update({name: "constexpr" for name in spec["constexprs"]})
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"{spec['kernel']}: aot_specs signature lacks arguments {missing}")
    sig = {a: sig[a] for a in fn.arg_names}
    attrs = spec.get("attrs")  # a spec may give ASTSource attrs itself
    if attrs is None:
        aligned = set(spec.get("divisible_by_16", ()))
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or a in aligned}
    return ASTSource(fn=fn, signature=sig, constexprs=dict(spec["constexprs"]), attrs=attrs)


def _res_usage(cubin_path: str, kernel_name: str) -> dict:
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    # "Function <name>:" then "REG:n STACK:n SHARED:n LOCAL:n ..." on the next line
    m = re.search(rf"Function {re.escape(kernel_name)}:\s*\n\s*(.*)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no entry for {kernel_name} in\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))}


_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*)")


def _count(ops: list[str]) -> dict:
    counts = dict.fromkeys(SASS_OPCODES, 0)
    for op in ops:
        base = op.split(".")[0]
        if base in counts:
            counts[base] += 1
        if op.startswith("MUFU.EX2"):
            counts["MUFU.EX2"] += 1
    return counts


def _main_loop(sass: str) -> tuple[list[tuple[str, str]], tuple[int, int] | None]:
    """The instructions of ``nvdisasm -c`` output as (opcode, operands), and the index range of the main
    loop: the first innermost loop in code order, a loop being the instructions from a label to a
    backward ``BRA`` to it (None without a loop)."""
    ops, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L\w+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        target = re.search(r"`\((\.L\w+)\)", m.group(2))
        if m.group(1) == "BRA" and target and target.group(1) in labels:
            loops.append((labels[target.group(1)], len(ops)))
        ops.append((m.group(1), m.group(2)))
    loops = [(a, b) for a, b in loops if a < b]  # not the self-branch that ends a kernel
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return ops, min(innermost, default=None)


def sass_counts(sass: str) -> tuple[dict, dict | None]:
    """Static counts of ``SASS_OPCODES`` in ``nvdisasm -c`` output (predicated instructions included):
    over the whole kernel, and over its main loop (``None`` without a loop).

    The main loop (``_main_loop``) is the source's main loop, which the compiler lays out before a
    peeled masked tail (a second loop of at most one trip) and the epilogue, so its counts say what
    every iteration but a segment's last executes."""
    ops, hot = _main_loop(sass)
    names = [op for op, _ in ops]
    return _count(names), (None if hot is None else _count(names[hot[0]:hot[1] + 1]))


def ex2_under_wgmma(sass: str) -> int | None:
    """How many of the main loop's ``MUFU.EX2`` (the softmax's exponentials) issue while a wgmma is in
    flight: after an ``HGMMA`` (each starts on issue; ``gsb0`` only marks a group's last) and before the
    next ``WARPGROUP.DEPBAR`` (taken as waiting for all: Triton emits ``gsb0, 0x0`` in these loops). The
    loop body is walked twice so that a group issued late in
    one iteration and waited in the next counts; the second walk is counted. 0 where the softmax
    overlaps no wgmma (and on sm_80, which has none); None without a loop."""
    ops, hot = _main_loop(sass)
    if hot is None:
        return None
    body = ops[hot[0]:hot[1] + 1]
    in_flight, count = False, 0
    for walk in range(2):
        for op, _ in body:
            if op.startswith("HGMMA"):
                in_flight = True
            elif op.startswith("WARPGROUP.DEPBAR"):
                in_flight = False
            elif op.startswith("MUFU.EX2") and in_flight and walk == 1:
                count += 1
    return count


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> tuple[int, str]:
    """CTAs of one kernel per SM of ``sm_<arch>`` and the resource that limits them."""
    lim = _SM_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by = {"registers": (lim["registers"] // regs_per_warp) // num_warps if regs_per_warp else lim["ctas"],
          "shared_memory": lim["shared"] // (shared_bytes + lim["shared_reserved"]),
          "warps": lim["warps"] // num_warps,
          "ctas": lim["ctas"]}
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    return by[limiter], limiter


def compile_spec(spec: dict, arch: int, dtype: str) -> dict:
    """Compile one spec for ``sm_<arch>`` and return its report row."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    except Exception as e:
        raise RuntimeError(f"{spec['kernel']} ({spec['direction']}, sm_{arch}, {dtype}): compile failed: {e}") from e
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _res_usage(path, compiled.metadata.name)
        text = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        sass, loop_sass = sass_counts(text)
    registers, shared = usage.get("REG", 0), int(compiled.metadata.shared)
    ctas, limiter = occupancy(registers, shared, spec["num_warps"], arch)
    return {
        "kernel": spec["kernel"],
        "direction": spec["direction"],
        "arch": f"sm_{arch}",
        "dtype": dtype,
        "head_dim": spec.get("head_dim"),
        "tile": spec.get("tile"),
        "config": spec.get("config", 0),
        "num_warps": spec["num_warps"],
        "registers": registers,
        "spill_bytes": usage.get("LOCAL", 0) + usage.get("STACK", 0),
        "shared_bytes": shared,
        "ctas_per_sm": ctas,
        "occupancy_limiter": limiter,
        "mma_instructions": sass["HMMA"] + sass["HGMMA"],
        "sass": sass,
        "loop_sass": loop_sass,
        "ex2_under_wgmma": ex2_under_wgmma(text),
    }


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _report_in_subprocess(archs, dtypes, ops, head_dims, notes, candidates) -> list[dict]:
    """Under TRITON_INTERPRET=1 every @triton.jit function is an interpreter object that cannot be
    compiled, so the compile runs in a fresh interpreter with the variable off."""
    cmd = [sys.executable, "-m", "mbt_fast.kernels.report", "--json", "--arch", *map(str, archs),
           "--dtype", *dtypes, "--ops", *ops, "--head-dim", *map(str, head_dims)] + (["--candidates"] if candidates else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if notes is not None:
        notes += [line[len("note: "):] for line in proc.stderr.splitlines() if line.startswith("note: ")]
    return json.loads(proc.stdout)


def compile_report(archs=(80, 90), dtypes=("fp16", "bf16"), ops=OPS, notes: list | None = None,
                   head_dims=(64,), candidates: bool = False) -> list[dict]:
    """One row per (kernel, arch, dtype[, head dim][, tile candidate]); missing op modules are skipped and
    described in ``notes``."""
    if _interpreting():
        return _report_in_subprocess(archs, dtypes, ops, head_dims, notes, candidates)
    rows = []
    for dtype in dtypes:
        if dtype not in _DTYPES:
            raise ValueError(f"dtypes: expected names from {tuple(_DTYPES)}, got {dtype!r}")
        for arch in archs:
            specs, missing = load_specs(dtype, ops, head_dims, int(arch), candidates)
            if notes is not None:
                notes += [n for n in missing if n not in notes]
            rows += [compile_spec(spec, int(arch), dtype) for spec in specs]
    return rows


# the table: every key but the ``sass`` dict, whose opcodes get a column each
_TABLE_KEYS = tuple(k for k in KEYS if k not in ("mma_instructions", "sass", "loop_sass"))


def format_table(rows: list[dict]) -> str:
    """One line per row; each opcode column reads ``main loop / whole kernel``."""
    head = [*_TABLE_KEYS, *SASS_OPCODES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loop = r["loop_sass"] or dict.fromkeys(SASS_OPCODES, "-")
        lines.append("| " + " | ".join(["-" if r[k] is None else str(r[k]) for k in _TABLE_KEYS]
                                       + [f"{loop[op]}/{r['sass'][op]}" for op in SASS_OPCODES]) + " |")
    return "\n".join(lines)


def _provenance() -> str:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return f"triton {triton.__version__}, torch {torch.__version__}, commit {commit or 'unknown'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mbt_fast.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=list(_DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64], choices=[32, 64, 128],
                        help="head dims of the attention kernels (default: 64, MBT-B's)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), help="op modules to compile (default: all)")
    parser.add_argument("--candidates", action="store_true",
                        help="compile every attention tile candidate of the autotune list, not only the static pick")
    parser.add_argument("--out", help="also write report.md and report.json into this folder")
    args = parser.parse_args(argv)

    notes: list[str] = []
    rows = compile_report(args.arch, args.dtype, args.ops, notes=notes, head_dims=args.head_dim,
                          candidates=args.candidates)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    table = format_table(rows)
    print(json.dumps(rows) if args.json else table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write("# Static kernel report (ahead-of-time compile, no GPU)\n\n"
                    f"Generated by `python -m mbt_fast.kernels.report` with {_provenance()}.\n"
                    "Static counts from the compiler at the MBT-B configuration (C=768, MLP 3072, head dim 64, "
                    "2 modalities, 5 bottleneck rows): registers per thread and spill/stack bytes from "
                    "`cuobjdump -res-usage`, shared memory from the compile metadata, CTAs per SM from "
                    "registers, shared memory and warps (CUDA's occupancy arithmetic, the limiting resource "
                    "named), and opcode counts in the `nvdisasm` SASS as main loop / whole kernel (the main loop is the "
                    "first innermost loop: what one main-loop iteration executes). "
                    "Not a measurement.\n\n")
            f.write(table + "\n")
            if notes:
                f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
