"""The one place that decides which backend runs (DESIGN.md section 4).

Nothing here touches a GPU or a Triton driver at import time; availability is probed on demand.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch

# eager_sdpa is the baseline a user would write (Scenic's structure with SDPA), not an oracle
BACKENDS = ("reference", "eager_sdpa", "torch", "triton", "cuda", "cuda-emu")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reasons(backend: str, device: torch.device | None = None) -> list[str]:
    """Every reason ``backend`` cannot run on ``device`` (empty list: it can)."""
    device = torch.device(device) if device is not None else None
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS + ('auto',))}"]
    reasons: list[str] = []
    if backend in ("reference", "eager_sdpa", "torch"):
        return reasons
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            reasons.append("the triton package is not installed")
        if device is not None and device.type == "cpu" and not triton_interpreting():
            reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton needs a CUDA device or its interpreter)")
        if device is None and not torch.cuda.is_available() and not triton_interpreting():
            reasons.append("no CUDA device is visible and TRITON_INTERPRET=1 is not set")
        return reasons
    try:
        from mbt_fast import cuda_ext  # local: keeps the extension loader out of import time
    except ImportError as e:
        return [f"the CUDA extension loader cannot be imported ({e})"]
    if backend == "cuda":
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is visible to torch")
        if device is not None and device.type != "cuda":
            reasons.append(f"tensors are on {device}, the cuda backend needs CUDA tensors")
        reasons += cuda_ext.build_problems(emulated=False)
    else:  # cuda-emu
        if device is not None and device.type != "cpu":
            reasons.append(f"cuda-emu runs the CUDA kernel sources on the CPU; tensors are on {device}")
        reasons += cuda_ext.build_problems(emulated=True)
    return reasons


def check_backend(backend: str, device: torch.device | None = None) -> None:
    """Raise ``RuntimeError`` listing every reason ``backend`` cannot run."""
    reasons = unavailable_reasons(backend, device)
    if reasons:
        raise RuntimeError(f"backend {backend!r} is unavailable: " + "; ".join(reasons))


@lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _device_evidence(device: torch.device | None) -> tuple[str, dict | None]:
    from mbt_fast import backend_evidence

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return backend_evidence.entry_for(device.type)
    return backend_evidence.entry_for("cuda", torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def auto_order(device: torch.device | None = None) -> tuple[list[str], str]:
    """The order ``auto`` tries on ``device``, fastest first by the evidence table, and the evidence in words."""
    from mbt_fast import backend_evidence

    key, entry = _device_evidence(device)
    return backend_evidence.order(entry), backend_evidence.describe(key, entry)


def resolve_backend(backend: str, device: torch.device | None = None) -> str:
    """Map ``auto`` to the fastest backend by evidence that can run; check an explicit one."""
    if backend != "auto":
        check_backend(backend, device)
        return backend
    names, why = auto_order(device)
    skipped = []
    for name in names:
        reasons = unavailable_reasons(name, device)
        if not reasons:
            if skipped:
                _warn_once(f"backend 'auto' picked {name!r} (ranking {why}); skipped faster ones: " + " | ".join(skipped))
            return name
        skipped.append(f"{name}: " + "; ".join(reasons))
    raise AssertionError("the torch and eager_sdpa backends are always available")


@lru_cache(maxsize=None)
def _resolved(backend: str, device_type: str | None, interpreting: bool) -> str:
    name = resolve_backend(backend, torch.device(device_type) if device_type else None)
    if name in ("cuda", "cuda-emu"):
        from mbt_fast import cuda_ext

        cuda_ext.build(emulated=name == "cuda-emu")  # loaded before any trace reaches its ops
    return name


@torch.compiler.assume_constant_result
def resolved_backend(backend: str, device_type: str | None = None) -> str:
    """``resolve_backend`` for the forward pass: probed once per (backend, device type), and a constant
    under ``torch.compile`` (the probe reads files and the environment, which no graph should)."""
    return _resolved(backend, device_type, triton_interpreting())
