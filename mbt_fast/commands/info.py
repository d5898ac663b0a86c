"""``mbt-fast info``: versions, which backends can run here (and why not), and what ``auto`` picks and why."""
from __future__ import annotations

import importlib.metadata
import platform
import warnings


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args) -> int:
    import torch

    from mbt_fast import __version__
    from mbt_fast import backend_evidence
    from mbt_fast.backends import BACKENDS, auto_order, resolve_backend, unavailable_reasons

    print(f"mbt_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {_version('triton')}  flash-attn {_version('flash-attn')}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"CUDA device: {cuda}  (torch built for CUDA {torch.version.cuda or 'none'})")
    print("backends:")
    for name in BACKENDS:
        reasons = unavailable_reasons(name)
        print(f"  {name:10s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning's reasons are the lines above
        picked = resolve_backend("auto")
    names, why = auto_order()
    print(f"auto: picks {picked!r} here; it tries {', '.join(names)} in that order, fastest first by {why}")
    print(f"auto's evidence table ({backend_evidence.TABLE.name}; a GPU measurement of the GPU itself beats the model):")
    for key, entry in backend_evidence.table()["devices"].items():
        print("  " + backend_evidence.describe(key, entry))
    from mbt_fast import cuda_ext

    aot = cuda_ext.aot_library()
    print("CUDA extension: " + (f"built ahead of time ({aot})" if aot else
          "not built ahead of time; JIT-built and cached on first use of backend 'cuda' (or run `mbt-fast build cuda`)"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(func=run)
