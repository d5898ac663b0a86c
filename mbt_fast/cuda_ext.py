"""The CUDA kernels of ``csrc/`` as PyTorch ops: backends ``cuda`` (real extension, CUDA tensors) and
``cuda-emu`` (the same kernel sources compiled by g++ against the project's emulation layer, CPU tensors).

Nothing is compiled or loaded at import time. ``build()`` loads the ahead-of-time extension
(``MBT_FAST_BUILD_CUDA=1 pip install``, module ``mbt_fast._C``) when present, else JIT-compiles with
ninja into TORCH_EXTENSIONS_DIR (cached; later calls only load). Recipe: ``csrc/build.py``.

The cuda attention runs on tensor cores in float16 / bfloat16 only: float32 inputs are rejected with
a TypeError (use the ``torch`` or ``triton`` backend). Head dims 32, 64, 128. ``residual_mean``,
``segment_layernorm`` (C <= 4096) and ``bias_gelu`` run in float32, float16 and bfloat16.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading

import torch

from mbt_fast.layout import PackedLayout

_LOCK = threading.RLock()
_LOADED: dict[bool, object] = {}
_BACKEND = {False: "cuda", True: "cuda-emu"}
_MODES = {"add": 0, "keep": 1, "mean": 2}
HEAD_DIMS = (32, 64, 128)


def _recipe():
    """csrc/build.py (package ``mbt_fast.csrc``), imported lazily."""
    from mbt_fast.csrc import build as recipe

    return recipe


def aot_library() -> str | None:
    """Path of the ahead-of-time built extension (mbt_fast._C), if installed."""
    try:
        spec = importlib.util.find_spec("mbt_fast._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def build_problems(emulated: bool) -> list[str]:
    """Why the (emulated) extension cannot be built or loaded here; empty when it can. Compiles nothing."""
    problems: list[str] = []
    home = _recipe().cuda_home()
    if home:  # before torch.utils.cpp_extension resolves it (the nvcc on PATH may be a wrapper script)
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils import cpp_extension

    if emulated:
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
            problems.append("no C++ compiler: g++ (or $CXX) is not on PATH")
        if _recipe().fp16_include_dir() is None:
            problems.append("cuda_fp16.h / cuda_bf16.h not found (set CUDA_HOME to a CUDA toolkit or install the nvidia-cuda-runtime wheel)")
        if not cpp_extension.is_ninja_available():
            problems.append("ninja is not installed (pip install ninja)")
        return problems
    if _LOADED.get(False) is not None or aot_library() is not None:
        return problems
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build and the extension is not built ahead of time")
        return problems
    if _recipe().nvcc_path() is None:
        problems.append("the extension is not built (MBT_FAST_BUILD_CUDA=1 pip install) and no CUDA toolkit was found to JIT-build it (set CUDA_HOME; nvcc missing)")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        problems.append("no host C++ compiler (g++) on PATH for nvcc")
    if not cpp_extension.is_ninja_available():
        problems.append("ninja is not installed (pip install ninja)")
    return problems


class _CaptureFds:
    """Tee file descriptors 1 and 2 into a file while ninja/nvcc write to them (subprocess output)."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        return False


def ptxas_report(log: str) -> list[str]:
    """The ptxas lines of a verbose nvcc log: per kernel and architecture, registers, spills, shared memory."""
    return [ln.strip() for ln in log.splitlines() if "ptxas info" in ln and
            ("Compiling entry function" in ln or "Used" in ln or "spill" in ln)]


def spills(log: str) -> dict[str, tuple[int, int]]:
    """{kernel (mangled) @ arch: (spill store bytes, spill load bytes)} parsed from a verbose nvcc log."""
    out, current = {}, None
    for ln in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", ln)
        if m:
            current = f"{m.group(1)}@{m.group(2)}"
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln)
        if m and current:
            out[current] = (int(m.group(1)), int(m.group(2)))
    return out


def build(emulated: bool = False, verbose: bool = False, build_directory: str | None = None):
    """Compile if needed and load the extension; returns its op namespace (``torch.ops.mbt_fast[_emu]``).

    Raises RuntimeError with every missing prerequisite, or with the compiler output when compilation
    fails. With ``verbose`` the compiler output (ptxas register/spill lines included) is captured and
    available from ``last_build_log()``. ``build_directory`` forces a JIT build there (tests, CI).
    """
    global _LAST_LOG
    with _LOCK:
        if emulated in _LOADED and build_directory is None:
            return _LOADED[emulated]
        problems = build_problems(emulated)
        if problems:
            raise RuntimeError(f"cannot build the {_BACKEND[emulated]} extension: " + "; ".join(problems))
        recipe = _recipe()
        aot = None if emulated or build_directory else aot_library()
        if aot is not None:
            torch.ops.load_library(aot)
        elif verbose:
            cap = _CaptureFds()
            try:
                with cap:
                    recipe.jit_load(emulated, verbose=True, build_directory=build_directory)
            except RuntimeError as e:  # the compiler output went to the captured descriptors: put it in the error
                raise RuntimeError(f"{e}\n{getattr(cap, 'text', '')}") from e
            finally:
                _LAST_LOG = getattr(cap, "text", "")
        else:
            recipe.jit_load(emulated, verbose=False, build_directory=build_directory)
        ops = getattr(torch.ops, recipe.OPS_NAMESPACE[emulated])
        _register_fakes(recipe.OPS_NAMESPACE[emulated])
        _LOADED[emulated] = ops
        return ops


_FAKES_REGISTERED: set[str] = set()


def _register_fakes(namespace: str) -> None:
    """Fake (meta) kernels of the C++ ops, defined next to each op's contract in ``mbt_fast.ops``."""
    if namespace in _FAKES_REGISTERED:
        return
    import importlib

    fakes = dict(_ARCH_TEST_FAKES)
    for op in ("attention", "residual_mean", "segment_layernorm", "bias_gelu"):
        fakes.update(importlib.import_module(f"mbt_fast.ops.{op}").CUDA_FAKES)
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    _FAKES_REGISTERED.add(namespace)


# the wrappers' own tests (csrc/common/arch_tests.cu): one warp's registers in, one warp's out
_ARCH_TEST_FAKES = {
    "arch_test_mma": lambda a_regs, b_regs, c, bf16: c.new_empty(32, 4),
    "arch_test_ldmatrix": lambda smem, row_offsets, num, trans: smem.new_empty(32, num, dtype=torch.int32),
    "arch_test_shfl_xor": lambda vals, lane_mask: torch.empty_like(vals, memory_format=torch.contiguous_format),
    # kernels with a planted bug each, and a launch with a given configuration (tests/csrc/test_emu_faults.py)
    "arch_test_smem_uninit": lambda vals, blocks: vals.new_empty(blocks, 2, 64),
    "arch_test_block_chain": lambda vals: torch.empty_like(vals, memory_format=torch.contiguous_format),
    "arch_test_vec16": lambda src, load_offset, store_offset: torch.empty_like(src, memory_format=torch.contiguous_format),
    "arch_test_launch": lambda val, grid_x, grid_y, grid_z, threads, smem_bytes, max_dynamic_smem: val.new_empty(1),
    "arch_test_cp_async": lambda src, wait: src.new_empty(2, 128),
}


def _ops(emulated: bool):
    """The op namespace, as a literal ``torch.ops`` attribute so that torch.compile traces the calls.
    Eager calls load the extension on first use; under compile it is already loaded
    (``backends.resolved_backend`` builds it before any trace)."""
    if not torch.compiler.is_compiling():
        build(emulated)
    return torch.ops.mbt_fast_emu if emulated else torch.ops.mbt_fast


_LAST_LOG = ""


def last_build_log() -> str:
    """Compiler output of the last ``build(verbose=True)`` (empty when nothing had to be compiled)."""
    return _LAST_LOG


# ----------------------------------------------------------------------------------------------------
# attention


_TABLES: dict = {}


def _cached(key, build):
    """Constant int32 tables, built and copied to their device once per key, so no call copies (or
    synchronises); under torch.compile they are built in the graph from the constants instead."""
    if torch.compiler.is_compiling():
        return build()
    if key not in _TABLES:
        _TABLES[key] = build()
    return _TABLES[key]


def _table(values: tuple, device) -> torch.Tensor:
    return _cached((values, str(device)), lambda: torch.tensor(values, dtype=torch.int32, device=device))


def _layout_tables(layout: PackedLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row -> modality and slot starts of ``layout`` on ``device``."""
    slots = tuple(layout.bottleneck_rows(m).start for m in range(layout.num_modalities))
    return _cached((layout, str(device)), lambda: (layout.row_weight(device),
                                                   torch.tensor(slots, dtype=torch.int32, device=device)))


def _check_device(name: str, t: torch.Tensor, emulated: bool):
    want = "cpu" if emulated else "cuda"
    if t.device.type != want:
        raise ValueError(f"{name}: the {_BACKEND[emulated]} backend needs {want} tensors, got {t.device}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Last dim contiguous and 16-byte aligned rows (the kernels load rows in 16-byte chunks)."""
    # under torch.compile the pointer is unknown: the strides decide, and the C++ launcher still checks
    # the pointer (with head dims 32/64/128 the q, k, v views of a packed qkv start 16-byte aligned)
    aligned = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    ok = t.stride(-1) == 1 and aligned and all(
        s % 8 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1)
    return t if ok else t.contiguous()


class MBTAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, scale, key_mask, emulated):
        out, lse = _ops(emulated).attention_fwd(q, k, v, seg, scale, key_mask)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        ctx.seg, ctx.scale, ctx.emulated = seg, scale, emulated
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = _ops(ctx.emulated).attention_bwd(_aligned(grad_out), q, k, v, out, lse, ctx.seg, ctx.scale,
                                                      key_mask)
        return dq, dk, dv, None, None, None, None


def mbt_attention(q, k, v, seg, scale, key_mask=None, emulated: bool = False):
    """Contract of ``mbt_fast.ops.mbt_attention`` (seg: int32 [S, 4] CPU table, already validated;
    key_mask: None or a validated contiguous bool [B, Nk])."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_device(name, t, emulated)
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: the {_BACKEND[emulated]} attention kernel runs on tensor cores in float16 or "
                            f"bfloat16, got {t.dtype}; use backend 'torch' or 'triton' for float32")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q: the {_BACKEND[emulated]} attention kernel supports head dims {HEAD_DIMS}, got {q.shape[-1]}")
    seg = _table(seg, "cpu")  # a host table: the C++ launcher builds its block tables from it
    key_mask = q.new_empty(0, dtype=torch.bool) if key_mask is None else key_mask  # empty: no mask (op schema)
    return MBTAttentionFunction.apply(_aligned(q), _aligned(k), _aligned(v), seg, float(scale), key_mask, emulated)


# ----------------------------------------------------------------------------------------------------
# residual + bottleneck mean


class ResidualMeanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, keep, row_mod, slot_start, n_bottleneck, mode, emulated):
        keep_t = keep if keep is not None else x.new_empty(0)
        out = _ops(emulated).residual_mean_fwd(x, y, keep_t, row_mod, slot_start, n_bottleneck, mode)
        ctx.save_for_backward(keep_t, row_mod, slot_start)
        ctx.args = (n_bottleneck, mode, emulated, y.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        keep_t, row_mod, slot_start = ctx.saved_tensors
        n_bottleneck, mode, emulated, y_dtype = ctx.args
        dx, dy = _ops(emulated).residual_mean_bwd(grad.contiguous(), keep_t, row_mod, slot_start, n_bottleneck, mode)
        # keep is a stochastic-depth mask, not a learned tensor: no gradient
        return dx, dy.to(y_dtype), None, None, None, None, None, None


def residual_mean(x, y, keep, layout: PackedLayout, bottleneck: str, emulated: bool = False):
    """Contract of ``mbt_fast.ops.residual_mean`` (inputs already validated there). No gradient for ``keep``."""
    for name, t in (("x", x), ("y", y)) + ((("keep", keep),) if keep is not None else ()):
        _check_device(name, t, emulated)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: the {_BACKEND[emulated]} residual_mean kernel supports float32, float16, bfloat16, got {x.dtype}")
    row_mod, slot_start = _layout_tables(layout, x.device)
    keep = keep.to(device=x.device, dtype=torch.float32).contiguous() if keep is not None else None
    return ResidualMeanFunction.apply(x.contiguous(), y.to(x.dtype).contiguous(), keep, row_mod, slot_start,
                                      layout.n_bottleneck, _MODES[bottleneck], emulated)



# ----------------------------------------------------------------------------------------------------
# segment LayerNorm and bias + tanh-GELU: per-modality weights picked by row_weight; the kernels read
# the (tiny) weight tables in fp32, whatever their dtype, and return fp32 gradients for them


_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYERNORM_MAX_C = 4096  # a row lives in registers: 8 values x at most 512 threads


def _check_rows(op: str, x, emulated: bool, tables):
    _check_device("x", x, emulated)
    for name, t in tables:
        _check_device(name, t, emulated)
    if x.dtype not in _ROW_DTYPES:
        raise TypeError(f"x: the {_BACKEND[emulated]} {op} kernel supports float32, float16, bfloat16, got {x.dtype}")


class SegmentLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, row_weight, eps, emulated):
        w32, b32 = weight.float().contiguous(), bias.float().contiguous()
        out, mean, rstd = _ops(emulated).segment_layernorm_fwd(x, w32, b32, row_weight, eps)
        ctx.save_for_backward(x, w32, row_weight, mean, rstd)
        ctx.args = (emulated, weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w32, row_weight, mean, rstd = ctx.saved_tensors
        emulated, w_dtype, b_dtype = ctx.args
        gx, dw, db = _ops(emulated).segment_layernorm_bwd(grad.to(x.dtype).contiguous(), x, w32, row_weight, mean, rstd)
        return gx, dw.to(w_dtype), db.to(b_dtype), None, None, None


def segment_layernorm(x, weight, bias, row_weight, eps, emulated: bool = False):
    """Contract of ``mbt_fast.ops.segment_layernorm`` (shapes already validated there); output in x's dtype."""
    _check_rows("segment_layernorm", x, emulated, (("weight", weight), ("bias", bias)))
    if x.shape[-1] > LAYERNORM_MAX_C:
        raise ValueError(f"x: the {_BACKEND[emulated]} segment_layernorm kernel supports at most {LAYERNORM_MAX_C} "
                         f"channels, got {x.shape[-1]}; use backend 'torch' or 'triton'")
    if bias.shape != weight.shape:
        raise ValueError(f"bias: expected the shape of weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    rw = row_weight.to(device=x.device, dtype=torch.int32).contiguous()
    return SegmentLayerNormFunction.apply(x.contiguous(), weight, bias, rw, float(eps), emulated)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, row_weight, emulated):
        b32 = bias.float().contiguous()
        out = _ops(emulated).bias_gelu_fwd(x, b32, row_weight)
        # nothing but the inputs is saved: the backward recomputes the GELU
        ctx.save_for_backward(x, b32, row_weight)
        ctx.args = (emulated, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, b32, row_weight = ctx.saved_tensors
        emulated, b_dtype = ctx.args
        gx, db = _ops(emulated).bias_gelu_bwd(grad.to(x.dtype).contiguous(), x, b32, row_weight)
        return gx, db.to(b_dtype), None, None


def bias_gelu(x, bias, row_weight, emulated: bool = False):
    """Contract of ``mbt_fast.ops.bias_gelu`` (shapes already validated there); output in x's dtype."""
    _check_rows("bias_gelu", x, emulated, (("bias", bias),))
    rw = row_weight.to(device=x.device, dtype=torch.int32).contiguous()
    return BiasGeluFunction.apply(x.contiguous(), bias, rw, emulated)
