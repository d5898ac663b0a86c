"""Static AOT report: the row-wise kernels compile for sm_80 and sm_90 without a GPU, keep every value
in registers (no spills), and the report has the documented shape."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # like the other kernel tests; the report compiles in a subprocess then

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from mbt_fast.kernels import report  # noqa: E402

ROW_OPS = ("residual_mean", "segment_layernorm", "residual_mean_layernorm", "bias_gelu")
ROW_KERNELS = {f"_{op}_{d}_kernel" for op in ROW_OPS for d in ("fwd", "bwd")}
TYPES = {"kernel": str, "direction": str, "arch": str, "dtype": str, "head_dim": (int, type(None)),
         "tile": (str, type(None)), "config": int, "num_warps": int,
         "registers": int, "spill_bytes": int, "shared_bytes": int, "ctas_per_sm": int, "occupancy_limiter": str,
         "mma_instructions": int, "sass": dict, "loop_sass": (dict, type(None)),
         "ex2_under_wgmma": (int, type(None))}


def _check_rows(rows):
    for row in rows:
        assert set(row) == set(TYPES), f"unexpected keys {sorted(row)}"
        for key, typ in TYPES.items():
            assert isinstance(row[key], typ), f"{row['kernel']}: {key} = {row[key]!r} is not {typ}"
        assert row["direction"] in ("fwd", "bwd") and row["arch"] in ("sm_80", "sm_90")
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] >= 0 and row["shared_bytes"] >= 0
        assert set(row["sass"]) == set(report.SASS_OPCODES) and 1 <= row["ctas_per_sm"] <= 32
        assert row["occupancy_limiter"] in ("registers", "shared_memory", "warps", "ctas")
        if row["loop_sass"] is not None:  # a loop is part of its kernel
            assert all(row["loop_sass"][op] <= row["sass"][op] for op in report.SASS_OPCODES), row


# a made-up nvdisasm listing: a prologue, a main loop (label to backward branch), a peeled masked copy
# of the body in a second loop, and the self-branch that ends every kernel
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   FFMA R5, R5, R6, -R7 ;
        /*0040*/                   MUFU.EX2 R5, R5 ;
        /*0050*/              @!P1 BRA `(.L_x_1) ;
.L_x_0:
.L_x_2:
        /*0060*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0070*/                   FSEL R5, R5, -INF , P2 ;
        /*0080*/                   FMUL R5, R5, R6 ;
        /*0090*/                   MUFU.EX2 R5, R5 ;
        /*00a0*/              @!P1 BRA `(.L_x_2) ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   BRA `(.L_x_3);
"""


def test_sass_counts():
    whole, loop = report.sass_counts(_SASS)
    assert (whole["HMMA"], whole["FSEL"], whole["FFMA"], whole["FMUL"], whole["MUFU.EX2"]) == (2, 1, 1, 1, 2)
    assert (loop["HMMA"], loop["FSEL"], loop["FFMA"], loop["FMUL"], loop["MUFU.EX2"]) == (1, 0, 1, 0, 1)
    assert report.sass_counts("        /*0000*/   EXIT ;\n.L_x_0:\n        /*0010*/   BRA `(.L_x_0);")[1] is None


# a made-up sm_90 main loop in the order the compiler lays it out: the Q K^T group and its wait, then the
# P V group with an exponential issued between its MMAs; the group's wait is in the next walk, after one
# more exponential (the loop entry is mid-iteration); the exponential after that wait overlaps nothing
_WGMMA_LOOP = """
.L_x_1:
        /*0000*/                   MUFU.EX2 R9, R9 ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0020*/                   MUFU.EX2 R9, R9 ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/                   WARPGROUP.ARRIVE ;
        /*0080*/                   HGMMA.64x64x16.F32.BF16 R56, gdesc[UR8].tnspB, R56 ;
        /*0090*/                   MUFU.EX2 R10, R10 ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R56, gdesc[UR9].tnspB, R56, gsb0 ;
        /*00b0*/              @!P1 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def test_ex2_under_wgmma():
    assert report.ex2_under_wgmma(_WGMMA_LOOP) == 2  # 0x0090 and, on the next walk, 0x0000 (not 0x0020)
    assert report.ex2_under_wgmma(_SASS) == 0  # sm_80: no wgmma
    assert report.ex2_under_wgmma("        /*0000*/   EXIT ;") is None


def test_occupancy_arithmetic():
    # 136 registers x 8 warps: 4352 per warp, 15 warps by the register file -> 1 CTA; 128 registers -> 2
    assert report.occupancy(136, 57856, 8, 90) == (1, "registers")
    assert report.occupancy(128, 57856, 8, 90) == (2, "registers")
    # 100 KB of shared memory: 2 CTAs on sm_90 (228 KB), 1 on sm_80 (164 KB)
    assert report.occupancy(64, 100 * 1024, 4, 90) == (2, "shared_memory")
    assert report.occupancy(64, 100 * 1024, 4, 80) == (1, "shared_memory")
    assert report.occupancy(24, 0, 4, 80) == (16, "warps")  # 64 warps per SM / 4


def test_row_kernels_sm80_sm90():
    rows = report.compile_report(archs=(80, 90), dtypes=("fp16",), ops=ROW_OPS)
    _check_rows(rows)
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ROW_KERNELS for a in ("sm_80", "sm_90")}
    for r in rows:
        assert r["spill_bytes"] == 0, f"{r['kernel']} spills {r['spill_bytes']} bytes on {r['arch']}: {r}"
        assert r["mma_instructions"] == 0, f"{r['kernel']} is elementwise/row-wise but has tensor-core instructions: {r}"
    text = report.format_table(rows)
    assert text.count("\n") == len(rows) + 1 and "_segment_layernorm_bwd_kernel" in text


def test_missing_op_is_a_note():
    specs, missing = report.load_specs("fp16", ops=("no_such_op",))
    assert specs == [] and "kernels/no_such_op.py does not exist" in missing[0]


@pytest.mark.slow
def test_full_report_cli(tmp_path):
    """Every kernel (attention included when present), both archs and dtypes, then the CLI's --out files."""
    rows = report.compile_report(archs=(80, 90), dtypes=("fp16", "bf16"))
    _check_rows(rows)
    assert {r["dtype"] for r in rows} == {"fp16", "bf16"}
    assert all(r["spill_bytes"] == 0 for r in rows if r["kernel"] in ROW_KERNELS)
    # the CLI writes the same rows to report.json / report.md
    subprocess.run([sys.executable, "-m", "mbt_fast.kernels.report", "--dtype", "fp16", "--arch", "80", "--ops",
                    *ROW_OPS, "--out", str(tmp_path)], check=True, env={**os.environ, "TRITON_INTERPRET": "0"},
                   capture_output=True)
    written = json.loads((tmp_path / "report.json").read_text())
    _check_rows(written)
    assert len(written) == 6 and "Not a measurement" in (tmp_path / "report.md").read_text()
