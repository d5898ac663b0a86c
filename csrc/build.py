"""Build recipe of the CUDA extension and of its CPU emulation, shared by ``setup.py`` (ahead of time),
``mbt_fast.cuda_ext`` (JIT on first use) and ``mbt-fast build cuda``.

* real extension ``mbt_fast_cuda``: nvcc for every ``.cu`` + g++ for ``binding.cpp``; ops ``torch.ops.mbt_fast.*``;
* emulated extension ``mbt_fast_emu``: g++ only, the same ``.cu`` sources included from ``emu/*_emu.cpp`` with
  ``MBT_EMULATE`` (CUDA threads as host threads, see ``emu/emu_runtime.h``); ops ``torch.ops.mbt_fast_emu.*``.

Environment quirks handled here, not by the user: ``CUDA_HOME`` defaults to ``/usr/local/cuda`` (the
``nvcc`` on PATH may be a wrapper script whose parent is not the toolkit); without a visible GPU the
architectures default to sm_80 and sm_90 with PTX for the highest (``TORCH_CUDA_ARCH_LIST`` wins when
set); the CUDA headers of
the ``nvidia`` wheels (``site-packages/nvidia/cu*/include``, with the cuBLAS/cuSPARSE headers torch's
CUDA headers include) go on the include path. This file imports nothing heavy at import time, so
``setup.py`` can load it by path.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import shutil

CSRC = os.path.dirname(os.path.abspath(__file__))
# one .cu per op (plus the arch wrapper tests); the emulated build includes each from emu/<name>_emu.cpp
OP_SOURCES = ("common/arch_tests", "attention/attention_fwd", "attention/attention_bwd", "residual_mean/residual_mean",
              "segment_layernorm/segment_layernorm", "bias_gelu/bias_gelu")
NAMES = {False: "mbt_fast_cuda", True: "mbt_fast_emu"}
OPS_NAMESPACE = {False: "mbt_fast", True: "mbt_fast_emu"}
# sm_80 and sm_90 SASS, plus compute_90 PTX that the driver JIT-compiles on newer GPUs (forward compatibility)
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

CXX_FLAGS = ["-O3", "-std=c++20"]
NVCC_FLAGS = [
    "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
    "-Xptxas", "-v",  # register / spill report per kernel (tests check 0 spill bytes for attention)
]
EMU_FLAGS = ["-O2", "-std=c++20", "-DMBT_EMULATE", "-pthread"]


def sources(emulated: bool, relative_to: str | None = None) -> list[str]:
    files = ["binding.cpp"]
    if emulated:
        files += [f"emu/{os.path.basename(s)}_emu.cpp" for s in OP_SOURCES]
    else:
        files += [f"{s}.cu" for s in OP_SOURCES]
    base = os.path.join(CSRC) if relative_to is None else os.path.relpath(CSRC, relative_to)
    return [os.path.join(base, f) for f in files]


def header_files() -> list[str]:
    """Every header the sources include (for change detection by callers that want it)."""
    out = []
    for ext in ("cuh", "h"):
        out += glob.glob(os.path.join(CSRC, "**", f"*.{ext}"), recursive=True)
    return sorted(out)


def cuda_home() -> str | None:
    """CUDA_HOME or CUDA_PATH when set, else /usr/local/cuda when present, else the toolkit of nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvcc_path() -> str | None:
    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return None


def nvidia_include_dirs() -> list[str]:
    """``site-packages/nvidia/cu*/include`` of the installed nvidia wheels (cuBLAS, cuSPARSE, cuda_fp16.h...)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")), reverse=True)
    return [d for d in dirs if os.path.isdir(d)]


def fp16_include_dir() -> str | None:
    """A folder holding cuda_fp16.h / cuda_bf16.h, needed by the emulated build (compiled as host code)."""
    home = cuda_home()
    candidates = ([os.path.join(home, "include")] if home else []) + nvidia_include_dirs()
    for d in candidates:
        if os.path.exists(os.path.join(d, "cuda_fp16.h")) and os.path.exists(os.path.join(d, "cuda_bf16.h")):
            return d
    return None


def arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST when set; else None (torch picks the visible GPUs) or DEFAULT_ARCH_LIST without a GPU."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    return None if torch.cuda.is_available() else DEFAULT_ARCH_LIST


def include_dirs(emulated: bool) -> list[str]:
    dirs = [CSRC]
    if emulated:
        d = fp16_include_dir()
        return dirs + ([d] if d else [])
    home = cuda_home()
    return dirs + ([os.path.join(home, "include")] if home else []) + nvidia_include_dirs()


@contextlib.contextmanager
def build_environment(emulated: bool):
    """CUDA_HOME and TORCH_CUDA_ARCH_LIST as this recipe wants them, for the duration of a build."""
    saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    from torch.utils import cpp_extension

    saved_home = cpp_extension.CUDA_HOME
    try:
        if not emulated:
            home = cuda_home()
            if home:
                os.environ["CUDA_HOME"] = home
                cpp_extension.CUDA_HOME = home  # torch resolved it once at import, possibly to a wrapper's parent
            archs = arch_list()
            if archs:
                os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def jit_load(emulated: bool, verbose: bool = False, build_directory: str | None = None) -> str:
    """Compile (ninja, incremental, cached under TORCH_EXTENSIONS_DIR) and load; returns the library path.

    The ops register themselves on load: ``torch.ops.mbt_fast.*`` or ``torch.ops.mbt_fast_emu.*``.
    """
    from torch.utils import cpp_extension

    kwargs = dict(
        name=NAMES[emulated],
        sources=sources(emulated),
        extra_include_paths=include_dirs(emulated),
        is_python_module=False,
        verbose=verbose,
        build_directory=build_directory,
    )
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    with build_environment(emulated):
        if emulated:
            return cpp_extension.load(extra_cflags=EMU_FLAGS, extra_ldflags=["-pthread"], with_cuda=False, **kwargs)
        return cpp_extension.load(extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, with_cuda=True, **kwargs)


def setup_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup.py (MBT_FAST_BUILD_CUDA=1): the real extension as mbt_fast._C."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    home = cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = home
    archs = arch_list()
    if archs:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
    root = os.path.dirname(CSRC)
    ext = CUDAExtension(
        name="mbt_fast._C",
        sources=sources(False, relative_to=root),
        include_dirs=include_dirs(False),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
