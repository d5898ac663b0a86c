"""Ahead-of-time compilation of the attention kernels for sm_80 and sm_90, no GPU needed.

Through the static report (``mbt_fast.kernels.report``, which compiles in a child process with the
interpreter off), at every head dim (32, 64, 128) and dtype (fp16, bf16, fp32), every tile candidate of
each architecture's autotune list (the static pick and the ones a GPU may choose when autotuning):

* no kernel spills (cuobjdump's STACK and LOCAL are 0) and shared memory fits the architecture;
* fp16/bf16 forward and backward GEMMs run on tensor cores (HMMA on sm_80; HGMMA or HMMA on sm_90);
* the design of the main loops (``loop_sass``, one iteration): fp16/bf16 main loops hold no select
  (FSEL; only a segment's last, partial block is masked, outside the loop), and the forward's softmax
  scale is folded into the exponent's argument (an FFMA per score, no FMUL per score);
* the sm_90 forward's TMA candidates load K and V by TMA (UTMALDG) in the main loop, not by cp.async;
* the sm_90 forward's ``overlap`` candidates issue most of the softmax's exponentials while the P V
  wgmma is in flight (``ex2_under_wgmma``); the in-order tiles issue none.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # like the other kernel tests; the report compiles in a subprocess then

import pytest  # noqa: E402

import torch  # noqa: E402

from mbt_fast.kernels import attention, report  # noqa: E402

HEAD_DIMS = (32, 64, 128)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # per CTA


@pytest.fixture(scope="module")
def rows():
    try:
        report._tool("cuobjdump"), report._tool("nvdisasm")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return report.compile_report(archs=(80, 90), dtypes=("fp16", "bf16", "fp32"), ops=("attention",),
                                 head_dims=HEAD_DIMS, candidates=True)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"fwd": "_mbt_attention_fwd_kernel", "pre": "_mbt_attention_bwd_preprocess_kernel",
           "dkdv": "_mbt_attention_bwd_dkdv_kernel", "dq": "_mbt_attention_bwd_dq_kernel"}


def test_every_candidate_compiled(rows):
    """Each (kernel, arch, dtype, head dim) row set is exactly that architecture's autotune list, the
    static pick first: a GPU can only pick a tile this report has compiled."""
    got = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["config"], r["tile"]) for r in rows}
    want = {(KERNELS[k], f"sm_{a}", t, d, i, attention._tile_name(c)) for a in (80, 90) for t in DTYPES
            for d in HEAD_DIMS for k, cands in attention._candidates(d, DTYPES[t], a).items()
            for i, c in enumerate(cands)}
    assert got == want
    assert {r["direction"] for r in rows} == {"fwd", "bwd"}


def test_tables_differ_by_architecture():
    """sm_80 and sm_90 get their own static picks where the static counts tell them apart (the sm_80
    forward at head dim 64: 32 query rows per warp, fewer LDSM per HMMA)."""
    picks = {a: attention._configs(64, torch.bfloat16, interpreting=False, arch=a) for a in (80, 90)}
    assert picks[80]["fwd"] != picks[90]["fwd"]
    assert picks[80]["fwd"]["BLOCK_M"] // (16 * picks[80]["fwd"]["num_warps"]) == 2


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


def test_sm80_forward_pick_reads_less_shared_memory_per_mma(rows):
    """The reason for the sm_80 pick, as a static count: fewer ldmatrix per tensor-core MMA in the main
    loop than the 128x64 tile on 8 warps, at no fewer resident warps per SM."""
    fwd = {r["tile"]: r for r in rows if r["kernel"] == KERNELS["fwd"] and r["arch"] == "sm_80"
           and r["dtype"] == "bf16" and r["head_dim"] == 64}
    pick = next(r for r in fwd.values() if r["config"] == 0)
    other = fwd["128x64 w8 s3"]

    def ratio(r):
        return r["loop_sass"]["LDSM"] / r["loop_sass"]["HMMA"]

    assert ratio(pick) < ratio(other), (pick["loop_sass"], other["loop_sass"])
    assert pick["ctas_per_sm"] * pick["num_warps"] >= other["ctas_per_sm"] * other["num_warps"], (pick, other)


def test_tma_candidates_load_by_tma(rows):
    """A ``tma`` tile's main loop copies K and V with two TMA loads and no cp.async; every other tile
    keeps cp.async (LDGSTS)."""
    fwd = [r for r in rows if r["kernel"] == KERNELS["fwd"] and r["dtype"] != "fp32"]
    assert any(" tma" in r["tile"] for r in fwd)
    for r in fwd:
        loop, where = r["loop_sass"], f"{r['arch']} {r['dtype']} D={r['head_dim']} {r['tile']}"
        if " tma" in r["tile"]:
            assert r["arch"] == "sm_90" and loop["UTMALDG"] == 2 and loop["LDGSTS"] == 0, f"{where}: {loop}"
        else:
            assert loop["UTMALDG"] == 0 and loop["LDGSTS"] > 0, f"{where}: {loop}"


def test_overlap_candidates_run_the_softmax_under_the_pv_wgmma(rows):
    """In an ``overlap`` tile's main loop at least half of the softmax's MUFU.EX2 issue while a wgmma is
    in flight (the P V of the block before); in every other forward tile none does (the wgmma is waited
    on right after Q K^T, and P V is issued after the softmax)."""
    fwd = [r for r in rows if r["kernel"] == KERNELS["fwd"] and r["arch"] == "sm_90" and r["dtype"] != "fp32"]
    assert any(" overlap" in r["tile"] for r in fwd)
    for r in fwd:
        where, ex2 = f"{r['dtype']} D={r['head_dim']} {r['tile']}", r["loop_sass"]["MUFU.EX2"]
        if " overlap" in r["tile"]:
            assert 2 * r["ex2_under_wgmma"] >= ex2, f"{where}: {r['ex2_under_wgmma']} of {ex2} exponentials overlapped"
        else:
            assert r["ex2_under_wgmma"] == 0, f"{where}: {r['ex2_under_wgmma']}"
