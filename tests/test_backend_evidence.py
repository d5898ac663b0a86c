"""``auto`` ranks backends by one evidence table (``mbt_fast/backend_evidence.json``): the shipped table is
what the committed ``bench/results`` give, a measurement of the GPU itself beats the model, and ``auto`` never
picks a backend the evidence says is slower than an available one."""
import contextlib
import csv
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

from mbt_fast import backend_evidence, backends

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def test_shipped_table_is_what_the_committed_results_give():
    built = json.dumps(backend_evidence.build(RESULTS), indent=1, sort_keys=True) + "\n"
    assert backend_evidence.TABLE.read_text() == built, "run `mbt-fast bench evidence` and commit the table"


def test_committed_model_estimate_is_the_current_model():
    """The model half of the evidence must not go stale when the performance model changes."""
    from mbt_fast.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "model", "--preset", backend_evidence.PRESET, "--batch", str(backend_evidence.BATCH), "--json"]) == 0
    now = json.loads(buf.getvalue())["backends"]
    committed = json.loads((RESULTS / "model" / f"{backend_evidence.PRESET}_b{backend_evidence.BATCH}.json").read_text())["backends"]
    for b in backend_evidence.CANDIDATES:
        for gpu in backend_evidence.GPU_CLASSES:
            assert committed[b]["est_ms"][gpu] == pytest.approx(now[b]["est_ms"][gpu], rel=1e-6), (b, gpu)


def _write_train_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = dict(op="train_step", status="ok", compile="False", preset="mbt_base_16x2", batch="8", amp="bf16", commit="abc")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(base) + ["backend", "median_ms", "measurement", "device"])
        w.writeheader()
        for r in rows:
            w.writerow({**base, **r})


def test_build_keys_gpu_measurements_by_device_and_prefers_mbt_base_batch_8(tmp_path):
    _write_train_csv(tmp_path / "h200" / "train.csv", [
        dict(backend="torch", median_ms="50", measurement="GPU measurement", device="NVIDIA H200"),
        dict(backend="triton", median_ms="40", measurement="GPU measurement", device="NVIDIA H200"),
        dict(backend="triton", median_ms="90", measurement="GPU measurement", device="NVIDIA H200", batch="32"),
        dict(backend="reference", median_ms="10", measurement="GPU measurement", device="NVIDIA H200"),  # not a candidate
        dict(backend="cuda", median_ms="1", measurement="GPU measurement", device="NVIDIA H200", status="error"),
        dict(backend="eager_sdpa", median_ms="1", measurement="GPU measurement", device="NVIDIA H200", compile="True"),
    ])
    _write_train_csv(tmp_path / "cpu" / "train.csv", [
        dict(backend="eager_sdpa", median_ms="700", measurement="CPU measurement", device="cpu", preset="mid", batch="4"),
        dict(backend="torch", median_ms="600", measurement="CPU measurement", device="cpu", preset="mid", batch="4"),
    ])
    devices = backend_evidence.build(tmp_path)["devices"]
    assert devices["NVIDIA H200"]["ms"] == {"torch": 50.0, "triton": 40.0}
    assert devices["NVIDIA H200"]["evidence"] == "GPU measurement"
    assert devices["cpu"]["ms"] == {"eager_sdpa": 700.0, "torch": 600.0}
    assert backend_evidence.order(devices["cpu"])[:2] == ["torch", "eager_sdpa"]


@pytest.fixture
def table(monkeypatch):
    """Replace the shipped table by one the test writes."""
    def use(devices):
        monkeypatch.setattr(backend_evidence, "table", lambda: {"devices": devices})
    return use


def test_a_measurement_of_the_gpu_beats_the_model_of_its_class(table):
    table({"NVIDIA H200": {"ms": {"cuda": 1.0}}, "model:h100": {"ms": {"triton": 1.0}}, "model:a100": {"ms": {"torch": 1.0}}})
    assert backend_evidence.entry_for("cuda", "NVIDIA H200", (9, 0))[0] == "NVIDIA H200"
    assert backend_evidence.entry_for("cuda", "NVIDIA H100 80GB HBM3", (9, 0))[0] == "model:h100"
    assert backend_evidence.entry_for("cuda", "NVIDIA A100-SXM4-40GB", (8, 0))[0] == "model:a100"
    assert backend_evidence.entry_for("cuda", "NVIDIA RTX A6000", (8, 6))[0] == "model:a100"
    assert backend_evidence.entry_for("cpu")[0] == "cpu"


def test_order_is_fastest_first_and_unknowns_go_last_plain_pytorch_first():
    assert backend_evidence.order({"ms": {"triton": 3.0, "cuda": 2.0, "eager_sdpa": 1.0, "torch": 4.0}}) == \
        ["eager_sdpa", "cuda", "triton", "torch"]
    assert backend_evidence.order({"ms": {"cuda": 2.0}}) == ["cuda", "torch", "eager_sdpa", "triton"]
    assert backend_evidence.order(None) == ["torch", "eager_sdpa", "triton", "cuda"]
    assert "no evidence" in backend_evidence.describe("cpu", None)


def test_auto_takes_the_fastest_available_and_names_what_it_skipped(table, monkeypatch):
    """Triton is ranked first but unavailable (no interpreter, no GPU): auto takes the next by evidence,
    eager_sdpa, not the old fixed order's torch, and the warning says why."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: triton is available")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends._warn_once.cache_clear()  # a warning given by an earlier test is given again
    table({"cpu": {"evidence": "CPU measurement", "workload": "w", "source": "cpu/train.csv",
                   "ms": {"triton": 1.0, "eager_sdpa": 2.0, "torch": 3.0}}})
    with pytest.warns(RuntimeWarning, match=r"backend 'auto' picked 'eager_sdpa' \(ranking cpu: .*skipped faster ones: triton: "):
        assert backends.resolve_backend("auto", torch.device("cpu")) == "eager_sdpa"


def test_auto_never_prefers_a_slower_available_backend(table, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton and torch both available on the CPU
    for ms, expect in (({"triton": 5.0, "torch": 3.0}, "torch"), ({"triton": 2.0, "torch": 3.0}, "triton")):
        table({"cpu": {"evidence": "CPU measurement", "workload": "w", "source": "s", "ms": ms}})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing faster was skipped: no warning
            assert backends.resolve_backend("auto", torch.device("cpu")) == expect


def test_info_prints_why_auto_picks(capsys):
    from mbt_fast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto: picks" in out and "fastest first by" in out and "model:h100" in out
