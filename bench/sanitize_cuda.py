"""``compute-sanitizer`` (memcheck, racecheck) on one small forward + backward of every CUDA kernel.

A small MBT training step on the ``cuda`` backend (two modalities, bottleneck fusion, a token count that
is not a multiple of any tile) runs each CUDA kernel forward and backward once; the sanitizer reports
out-of-bounds or misaligned accesses (memcheck) and shared-memory hazards (racecheck). Each tool runs the
step in its own process; ``sanitizer.json`` holds each tool's status and its summary line.

Without ``compute-sanitizer`` on the PATH or in CUDA_HOME the tools are skipped, said so. ``--dry-run``
runs the step itself on ``cuda-emu`` (the same CUDA sources on the CPU) without a sanitizer, so that the
script is exercised where no GPU is.

    python bench/sanitize_cuda.py --out DIR              # on a GPU
    python bench/sanitize_cuda.py --out DIR --dry-run    # anywhere: the step on cuda-emu, no sanitizer
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLS = ("memcheck", "racecheck")


def sanitizer_path() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = Path(home) / "bin" / "compute-sanitizer"
    return str(path) if path.is_file() else None


def small_step(backend: str) -> float:
    """One forward + backward of a small MBT on ``backend``; returns the loss (finite, or it raises)."""
    import torch
    import torch.nn.functional as F

    from mbt_fast.config import MBTConfig
    from mbt_fast.model import MBT

    device = torch.device("cuda" if backend == "cuda" else "cpu")
    cfg = MBTConfig(hidden_size=64, num_heads=2, mlp_dim=128, num_layers=2, fusion_layer=1, n_bottlenecks=3,
                    num_classes=5, input_shapes={"rgb": (-1, 2, 48, 48, 3), "spectrogram": (-1, 80, 32, 3)})
    # the GPU step runs under bf16 autocast; the emulation has no autocast, so it runs in bf16 throughout
    dtype = torch.float32 if device.type == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    model = MBT(cfg, backend=backend).to(device=device, dtype=dtype).train()
    inputs = {"rgb": (torch.rand(2, 3, *cfg.rgb_shape) * 2 - 1).to(device, dtype),
              "spectrogram": torch.randn(2, *cfg.spectrogram_shape).to(device, dtype)}
    labels = torch.tensor([1, 3], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model.forward_per_modality(**inputs)
        loss = sum(F.cross_entropy(v.float(), labels) for v in logits.values()) / len(logits)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    value = float(loss.detach())
    grads_finite = all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    if not (value == value and grads_finite):
        raise RuntimeError(f"non-finite loss or gradients on {backend}: loss {value}")
    return value


def run_tool(tool: str, exe: str, out: Path, budget_s: float) -> dict:
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20", sys.executable, __file__, "--child"]
    t0 = time.perf_counter()
    log = out / f"sanitizer_{tool}.log"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s)
        text = r.stdout + r.stderr
        rc = r.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {budget_s:.0f} s", None
    log.write_text(" ".join(cmd) + "\n" + text)
    summary = next((ln.strip() for ln in reversed(text.splitlines()) if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln),
                   "(no summary line)")
    errors = re.search(r"(\d+) (?:errors|hazards)", summary)
    status = "ok" if rc == 0 else ("timed out" if rc is None else f"failed (exit {rc})")
    return {"tool": tool, "status": status, "summary": summary, "errors": int(errors.group(1)) if errors else None,
            "seconds": round(time.perf_counter() - t0, 1), "log": log.name}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for sanitizer.json and the tools' logs")
    ap.add_argument("--dry-run", action="store_true", help="the step on cuda-emu without a sanitizer (CPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the process a tool watches
    ap.add_argument("--budget-s", type=float, default=15.0, help="seconds per tool")
    args = ap.parse_args(argv)
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.child:
        print(f"loss {small_step('cuda'):.6f}")
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"label": "CPU dry run: cuda-emu, no sanitizer" if args.dry_run else "GPU run under compute-sanitizer",
              "tools": []}
    rc = 0
    if args.dry_run:
        report["loss"] = small_step("cuda-emu")
        report["tools"] = [{"tool": t, "status": "skipped", "summary": "dry run: no GPU to sanitize"} for t in TOOLS]
    elif (exe := sanitizer_path()) is None:
        report["tools"] = [{"tool": t, "status": "skipped", "summary": "compute-sanitizer not found (PATH, CUDA_HOME/bin)"}
                           for t in TOOLS]
    else:
        report["sanitizer"] = exe
        for tool in TOOLS:
            report["tools"].append(run_tool(tool, exe, out, args.budget_s))
            print(f"  {tool}: {report['tools'][-1]['status']}: {report['tools'][-1]['summary']}", flush=True)
        rc = 0 if all(t["status"] == "ok" for t in report["tools"]) else 1
    (out / "sanitizer.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'sanitizer.json'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
