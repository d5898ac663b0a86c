"""Static AOT report: the row-wise kernels compile for sm_80 and sm_90 without a GPU, keep every value
in registers (no spills), and the report has the documented shape."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # like the other kernel tests; the report compiles in a subprocess then

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from mbt_fast.kernels import report  # noqa: E402

ROW_OPS = ("residual_mean", "segment_layernorm", "bias_gelu")
ROW_KERNELS = {f"_{op}_{d}_kernel" for op in ROW_OPS for d in ("fwd", "bwd")}
TYPES = {"kernel": str, "direction": str, "arch": str, "dtype": str, "registers": int, "spill_bytes": int,
         "shared_bytes": int, "mma_instructions": int}


def _check_rows(rows):
    for row in rows:
        assert set(row) == set(TYPES), f"unexpected keys {sorted(row)}"
        for key, typ in TYPES.items():
            assert isinstance(row[key], typ), f"{row['kernel']}: {key} = {row[key]!r} is not {typ.__name__}"
        assert row["direction"] in ("fwd", "bwd") and row["arch"] in ("sm_80", "sm_90")
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] >= 0 and row["shared_bytes"] >= 0


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
