"""Ahead-of-time compilation of the attention kernels for sm_80 and sm_90, no GPU needed.

Through the static report (``mbt_fast.kernels.report``, which compiles in a child process with the
interpreter off), at every head dim (32, 64, 128) and dtype (fp16, bf16, fp32):

* no kernel spills (cuobjdump's STACK and LOCAL are 0) and shared memory fits the architecture;
* fp16/bf16 forward and backward GEMMs run on tensor cores (HMMA on sm_80; HGMMA or HMMA on sm_90);
* the design of the main loops (``loop_sass``, one iteration): fp16/bf16 main loops hold no select
  (FSEL; only a segment's last, partial block is masked, outside the loop), and the forward's softmax
  scale is folded into the exponent's argument (an FFMA per score, no FMUL per score).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # like the other kernel tests; the report compiles in a subprocess then

import pytest  # noqa: E402

from mbt_fast.kernels import report  # noqa: E402

HEAD_DIMS = (32, 64, 128)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # per CTA


@pytest.fixture(scope="module")
def rows():
    try:
        report._tool("cuobjdump"), report._tool("nvdisasm")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return report.compile_report(archs=(80, 90), dtypes=("fp16", "bf16", "fp32"), ops=("attention",),
                                 head_dims=HEAD_DIMS)


def test_every_configuration_compiled(rows):
    got = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"]) for r in rows}
    kernels = {r["kernel"] for r in rows}
    assert len(kernels) == 4 and {r["direction"] for r in rows} == {"fwd", "bwd"}
    assert got == {(k, a, t, d) for k in kernels for a in ("sm_80", "sm_90") for t in ("fp16", "bf16", "fp32")
                   for d in HEAD_DIMS}


def test_no_spills_and_shared_memory_fits(rows):
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} D={r['head_dim']}"
        assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} spill bytes ({r})"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"{where}: shared memory {r['shared_bytes']} too large"
        assert r["ctas_per_sm"] >= 1, f"{where}: does not fit on an SM ({r})"


def test_tensor_cores(rows):
    for r in rows:
        if "preprocess" in r["kernel"] or r["dtype"] == "fp32":  # a row reduction; IEEE fp32 runs on FMA units
            continue
        loop = r["loop_sass"]
        mma = loop["HMMA"] if r["arch"] == "sm_80" else loop["HGMMA"] + loop["HMMA"]
        assert mma > 0, f"{r['kernel']} {r['arch']} {r['dtype']} D={r['head_dim']}: no tensor-core MMA in the main loop ({r})"


def test_main_loops_unmasked_and_scale_folded(rows):
    for r in rows:
        if "preprocess" in r["kernel"] or r["dtype"] == "fp32":  # fp32 keeps one masked loop (_peel_tail)
            continue
        where = f"{r['kernel']} {r['arch']} {r['dtype']} D={r['head_dim']}"
        loop = r["loop_sass"]
        assert loop["FSEL"] == 0, f"{where}: {loop['FSEL']} selects per main-loop iteration ({loop})"
        if "fwd" in r["kernel"]:
            # one exp2 argument per score: FFMA (score * scale - max), as many as the MUFU.EX2 of the scores
            assert loop["FFMA"] >= loop["MUFU.EX2"] - 2, f"{where}: scale not folded into the exponent ({loop})"
