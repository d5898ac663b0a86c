"""Ahead-of-time compilation of the attention kernels for sm_80 and sm_90, no GPU needed.

At the MBT-B configuration (head dim 64, fp16 and bf16) forward and backward must use tensor cores
(HMMA on sm_80; HGMMA or HMMA on sm_90) and spill nothing (cuobjdump's STACK and LOCAL are 0).
Kernels defined under TRITON_INTERPRET=1 cannot be compiled, so the compilation runs in a child
process with the interpreter off; this file is also that child's script.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ARCHS = (80, 90)
DTYPES = ("float16", "bfloat16")


def _tool(name):
    import triton

    for folder in (os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"), "/usr/local/cuda/bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def _compile_all():
    """{dtype: {arch: {kernel: {...}}}}: registers, spill bytes, shared memory and MMA counts."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mbt_fast.kernels.attention import aot_specs

    out = {}
    for dtype in DTYPES:
        for arch in ARCHS:
            for spec in aot_specs(getattr(torch, dtype)):
                src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                attrs=spec["attrs"])
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                                           text=True, check=True).stdout
                    sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                                          check=True).stdout
                out.setdefault(dtype, {}).setdefault(str(arch), {})[spec["kernel"]] = {
                    "direction": spec["direction"],
                    "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                    "spill_bytes": sum(int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)),
                    "shared": kernel.metadata.shared,
                    "hmma": len(re.findall(r"\bHMMA\b", sass)),
                    "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
                }
    return out


@pytest.fixture(scope="module")
def report():
    missing = [t for t in ("cuobjdump", "nvdisasm") if _tool(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} found neither in triton/backends/nvidia/bin nor /usr/local/cuda/bin")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_cores_and_no_spills(report, dtype, arch):
    kernels = report[dtype][str(arch)]
    assert {k["direction"] for k in kernels.values()} == {"fwd", "bwd"}
    for name, k in kernels.items():
        assert k["spill_bytes"] == 0, f"{name} sm_{arch} {dtype}: {k['spill_bytes']} spill bytes ({k})"
        if "preprocess" in name:  # a row reduction, no GEMM
            continue
        mma = k["hmma"] if arch == 80 else k["hgmma"] + k["hmma"]
        assert mma > 0, f"{name} sm_{arch} {dtype}: no tensor-core instruction ({k})"
        assert k["shared"] <= (163 if arch == 80 else 227) * 1024, f"{name}: shared memory {k['shared']} too large"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
