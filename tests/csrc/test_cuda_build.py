"""Building the extensions: the recipe (csrc/build.py), build_problems, the ``mbt-fast build`` command, and
(slow) a real nvcc build for sm_80 + sm_90: compile, link, load, ops registered, no register spills in
the attention kernels per ``ptxas -v``."""
import os
import re
import subprocess

import pytest
import torch

from mbt_fast import cli, cuda_ext
from mbt_fast.csrc import build as recipe


def test_recipe_sources_and_environment(monkeypatch):
    for emulated in (False, True):
        for path in recipe.sources(emulated):
            assert os.path.exists(path), path
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if not torch.cuda.is_available():
        assert recipe.arch_list() == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert recipe.arch_list() == "9.0"
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert recipe.cuda_home() == "/usr/local/cuda"
    monkeypatch.setenv("CUDA_HOME", "/opt/elsewhere")
    assert recipe.cuda_home() == "/opt/elsewhere"


def test_setup_kwargs_describe_the_real_extension():
    from torch.utils.cpp_extension import BuildExtension

    kw = recipe.setup_kwargs()
    (ext,) = kw["ext_modules"]
    assert ext.name == "mbt_fast._C" and kw["cmdclass"]["build_ext"] is BuildExtension
    assert {os.path.basename(s) for s in ext.sources} >= {"binding.cpp", "attention_fwd.cu", "attention_bwd.cu", "residual_mean.cu"}
    assert "-Xptxas" in ext.extra_compile_args["nvcc"]


def test_build_problems_name_what_is_missing(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    problems = cuda_ext.build_problems(emulated=True)
    assert any("g++" in p for p in problems), problems
    monkeypatch.setattr(recipe, "fp16_include_dir", lambda: None)
    assert any("cuda_fp16.h" in p for p in cuda_ext.build_problems(emulated=True))
    if cuda_ext._LOADED.get(False) is None and cuda_ext.aot_library() is None and torch.version.cuda:
        monkeypatch.setattr(recipe, "nvcc_path", lambda: None)
        assert any("nvcc" in p for p in cuda_ext.build_problems(emulated=False))


@pytest.mark.skipif(bool(cuda_ext.build_problems(emulated=True)), reason="; ".join(cuda_ext.build_problems(emulated=True)) or "ok")
def test_build_command_emu(capsys):
    assert cli.main(["build", "cuda", "--emu"]) == 0
    assert "torch.ops.mbt_fast_emu" in capsys.readouterr().out


def test_spill_parser():
    log = """ptxas info    : Compiling entry function '_ZN8mbt_fast25_mbt_attention_fwd_kernelI6__halfLi64EEEvN3mbt4attn6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN8mbt_fast25_mbt_attention_fwd_kernelI6__halfLi64EEEvN3mbt4attn6ParamsE
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 0 barriers, 544 bytes cmem[0]"""
    spills = cuda_ext.spills(log)
    assert spills == {"_ZN8mbt_fast25_mbt_attention_fwd_kernelI6__halfLi64EEEvN3mbt4attn6ParamsE@sm_90": (8, 12)}
    assert len(cuda_ext.ptxas_report(log)) == 2


@pytest.mark.slow
@pytest.mark.skipif(bool(cuda_ext.build_problems(emulated=False)), reason="; ".join(cuda_ext.build_problems(emulated=False)) or "ok")
def test_nvcc_build_sm80_sm90_no_spills(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", recipe.DEFAULT_ARCH_LIST)  # what a GPU-less build gets
    ops = cuda_ext.build(emulated=False, verbose=True, build_directory=str(tmp_path / "build"))
    log = cuda_ext.last_build_log()
    for op in ("attention_fwd", "attention_bwd", "residual_mean_fwd", "residual_mean_bwd", "segment_layernorm_fwd",
               "segment_layernorm_bwd", "bias_gelu_fwd", "bias_gelu_bwd"):
        assert hasattr(ops, op), op
    spills = cuda_ext.spills(log)
    attention = {k: v for k, v in spills.items() if "mbt_attention" in k}
    # fwd and dq (each with and without a key mask), dkv, preprocess x {half, bf16} x {32, 64, 128} per architecture
    for arch in ("sm_80", "sm_90"):
        assert sum(k.endswith("@" + arch) for k in attention) == 36, sorted(attention)
    spilled = {k: v for k, v in spills.items() if v != (0, 0)}  # every kernel, not only attention
    assert not spilled, f"kernels spill: {spilled}"
    # tensor cores: HMMA.16816 and LDSM (ldmatrix) in the SASS of both architectures (triton's bundled cuobjdump)
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return
    for obj in ("attention_fwd.cuda.o", "attention_bwd.cuda.o"):
        sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "build" / obj)], capture_output=True, text=True).stdout
        for arch in ("sm_80", "sm_90"):
            part = sass.split(f"arch = {arch}")[1].split("arch = ")[0] if f"arch = {arch}" in sass else ""
            # tensor cores fed by ldmatrix, tiles loaded by cp.async (LDGSTS), not LDG + STS through registers
            for dtype_op in ("HMMA.16816.F32 ", "HMMA.16816.F32.BF16", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128"):
                assert dtype_op in part, f"{obj} {arch}: no {dtype_op.strip()} in the SASS"
            if obj == "attention_fwd.cuda.o":
                _check_forward_sass(part, arch)
            else:
                _check_backward_sass(part, arch)
        # +PTX: compute_90 PTX embedded beside the SASS, for GPUs newer than sm_90 to JIT-compile
        ptx = subprocess.run([cuobjdump, "-lptx", str(tmp_path / "build" / obj)], capture_output=True, text=True).stdout
        assert "sm_90" in ptx and "sm_80" not in ptx, f"{obj}: expected compute_90 PTX only, cuobjdump -lptx says {ptx!r}"


def _check_forward_sass(part, arch):
    """The forward's design in its SASS: O stored as 16-byte row chunks (staged through shared memory), and
    at D <= 64 32-row warps, so each K/V fragment from ldmatrix feeds 4 mma: LDSM per HMMA at most 0.35
    over the whole kernel, Q loads included (0.28 with 128-row tiles; 0.56 with 16-row warps)."""
    kernels = {chunk.split()[0]: chunk for chunk in part.split("Function : ")[1:]}
    forward = {name: body for name, body in kernels.items() if "mbt_attention_fwd" in name}
    assert len(forward) == 12, sorted(forward)  # {half, bf16} x {32, 64, 128} x {key mask, none}
    for name, body in forward.items():
        assert "STG.E.128" in body, f"{arch} {name}: no 16-byte global store (STG.E.128) of O"
        if "Li128E" not in name:
            hmma, ldsm = body.count(" HMMA."), body.count(" LDSM.")
            assert 0 < ldsm <= 0.35 * hmma, f"{arch} {name}: {ldsm} LDSM for {hmma} HMMA (> 0.35 per HMMA)"


def _main_loop(body):
    """The instructions of the loop (a backward branch's span) holding the most HMMA."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]
    best = []
    for a, t in ins:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            loop = [tt for aa, tt in ins if int(m.group(1), 16) <= aa <= a]
            if sum(x.startswith("HMMA") for x in loop) > sum(x.startswith("HMMA") for x in best):
                best = loop
    return best


def _check_backward_sass(part, arch):
    """The backward's design in its SASS: at D <= 64 the A operands (Q, dO in dQ; K, V in dK/dV) stay in
    registers, so the key / query loop reads only B operands: one LDSM per 2 HMMA (A re-read from shared
    memory at every k-step: 0.56-0.58)."""
    kernels = {chunk.split()[0]: chunk for chunk in part.split("Function : ")[1:]}
    backward = {name: body for name, body in kernels.items() if re.search(r"mbt_attention_bwd_d(q|kv)_kernel", name)}
    assert len(backward) == 18, sorted(backward)  # {half, bf16} x {32, 64, 128} x {dq, dq with a key mask, dkv}
    for name, body in backward.items():
        if "Li128E" in name:
            continue
        loop = [t.split()[0] for t in _main_loop(body)]
        hmma, ldsm = sum(o.startswith("HMMA") for o in loop), sum(o.startswith("LDSM") for o in loop)
        assert 0 < ldsm <= 0.5 * hmma, f"{arch} {name}: main loop has {ldsm} LDSM for {hmma} HMMA (> 0.5 per HMMA)"


def _cuobjdump():
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    return shutil.which("cuobjdump")
