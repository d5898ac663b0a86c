"""``mbt-fast info``: versions, and which backends can run here (and why not)."""
from __future__ import annotations

import importlib.metadata
import platform


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args) -> int:
    import torch

    from mbt_fast import __version__
    from mbt_fast.backends import BACKENDS, unavailable_reasons

    print(f"mbt_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {_version('triton')}  flash-attn {_version('flash-attn')}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    print(f"CUDA device: {cuda}  (torch built for CUDA {torch.version.cuda or 'none'})")
    print("backends:")
    for name in BACKENDS:
        reasons = unavailable_reasons(name)
        print(f"  {name:10s} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    from mbt_fast import cuda_ext

    aot = cuda_ext.aot_library()
    print("CUDA extension: " + (f"built ahead of time ({aot})" if aot else
          "not built ahead of time; JIT-built and cached on first use of backend 'cuda' (or run `mbt-fast build cuda`)"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(func=run)
