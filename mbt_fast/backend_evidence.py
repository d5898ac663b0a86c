"""The table ``auto`` ranks backends by: one training-step time per backend and device kind, from evidence.

Evidence, best first: a GPU measurement of that GPU (``train.csv`` rows of ``mbt-fast bench train`` or
``mbt-fast bench gpu`` committed under ``bench/results/<gpu>/``), else the performance model's central
estimate for the GPU class (``bench/results/model/*.json``); on the CPU, the CPU measurement in
``bench/results/cpu/train.csv``. The table is generated from those files into ``backend_evidence.json``
(shipped with the package: an installed copy has no ``bench/results``) by ``mbt-fast bench evidence``;
a test checks that the committed table is what the committed results give.
"""
from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("backend_evidence.json")
CANDIDATES = ("cuda", "triton", "torch", "eager_sdpa")  # what auto may pick: not the oracle, not the emulator
# the step auto is for (training MBT-B); a GPU measurement or model of this preset and batch wins
PRESET, BATCH = "mbt_base_16x2", 8
GPU_CLASSES = ("h100", "a100")  # the perf model's GPUs (mbt_fast.perf_model.PEAKS)


# ---- building the table from bench/results -------------------------------------------------------------
def _train_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f)
                if r.get("op") == "train_step" and r.get("status") == "ok" and r.get("compile") == "False"
                and r.get("backend") in CANDIDATES and r.get("median_ms")]


def _measured_entry(rows: list[dict], source: str) -> dict:
    """The rows of one preset and batch: MBT-B at batch 8 if present, else the workload with figures for
    the most backends, then the heaviest one (longest step: nearest to real training)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["preset"], int(r["batch"])), []).append(r)
    preset, batch = max(groups, key=lambda k: (k == (PRESET, BATCH), k[0] == PRESET, len(groups[k]),
                                               max(float(r["median_ms"]) for r in groups[k]), k))
    pick = groups[(preset, batch)]
    return {"evidence": pick[0]["measurement"], "source": source, "commit": pick[0].get("commit", ""),
            "workload": f"training step, preset {preset}, batch {batch}, {pick[0].get('amp', '')}",
            "ms": {r["backend"]: round(float(r["median_ms"]), 3) for r in pick}}


def build(results: Path) -> dict:
    """The table from a ``bench/results`` folder."""
    results = Path(results)
    devices: dict[str, dict] = {}
    for path in sorted(results.rglob("train.csv")):
        rows = _train_rows(path)
        src = path.relative_to(results).as_posix()
        for label, key in (("GPU measurement", None), ("CPU measurement", "cpu")):
            by_device: dict[str, list] = {}
            for r in rows:
                if r.get("measurement") == label:
                    by_device.setdefault(key or r["device"], []).append(r)
            for dev, rs in by_device.items():
                devices.setdefault(dev, _measured_entry(rs, src))  # sorted paths: the first file wins, stated
    model = results / "model" / f"{PRESET}_b{BATCH}.json"
    if model.is_file():
        report = json.loads(model.read_text())
        for gpu in GPU_CLASSES:
            ms = {b: round(v["est_ms"][gpu], 3) for b, v in report["backends"].items() if b in CANDIDATES and gpu in v.get("est_ms", {})}
            rng = {b: [round(x, 3) for x in v["est_ms_range"][gpu]] for b, v in report["backends"].items()
                   if b in ms and "est_ms_range" in v}
            devices[f"model:{gpu}"] = {"evidence": "model estimate (central)", "source": f"model/{model.name}",
                                       "workload": f"training step, preset {report['preset']}, batch {report['batch']}, "
                                                   f"{report.get('precision', '')}", "ms": ms, "range_ms": rng}
    return {"about": "auto's backend ranking: lower ms first. Regenerate with `mbt-fast bench evidence`.",
            "devices": devices}


# ---- reading it --------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def table() -> dict:
    return json.loads(TABLE.read_text()) if TABLE.is_file() else {"devices": {}}


def gpu_class(name: str, capability: tuple[int, int] | None) -> str:
    """The modelled GPU nearest to ``name``: A100-class for sm_8x, H100-class for Hopper and anything newer."""
    if "A100" in name or "A800" in name or (capability is not None and capability[0] == 8):
        return "a100"
    return "h100"


def entry_for(device_type: str, gpu_name: str | None = None, capability: tuple[int, int] | None = None) -> tuple[str, dict | None]:
    """(key, entry) of the evidence that applies: this GPU's measurement, else its class's model estimate."""
    devices = table()["devices"]
    if device_type != "cuda":
        return "cpu", devices.get("cpu")
    if gpu_name in devices:
        return gpu_name, devices[gpu_name]
    key = f"model:{gpu_class(gpu_name or '', capability)}"
    return key, devices.get(key)


def order(entry: dict | None) -> list[str]:
    """Candidates fastest first by the entry; those it has no figure for go last, plain PyTorch first."""
    ms = (entry or {}).get("ms", {})
    known = sorted((b for b in CANDIDATES if b in ms), key=lambda b: ms[b])
    return known + [b for b in ("torch", "eager_sdpa", "triton", "cuda") if b not in known]


def describe(key: str, entry: dict | None) -> str:
    if entry is None:
        return f"{key}: no evidence in {TABLE.name}; plain PyTorch first, kernels last"
    figures = ", ".join(f"{b} {entry['ms'][b]:.1f} ms" + (f" [{entry['range_ms'][b][0]:.1f}, {entry['range_ms'][b][1]:.1f}]"
                                                           if b in entry.get("range_ms", {}) else "")
                        for b in order(entry) if b in entry["ms"])
    missing = [b for b in CANDIDATES if b not in entry["ms"]]
    return (f"{key}: {entry['evidence']}, {entry['workload']} (bench/results/{entry['source']}"
            + (f", commit {entry['commit']}" if entry.get("commit") else "") + f"): {figures}"
            + (f"; no figure for {', '.join(missing)} (ranked last)" if missing else ""))


# ---- CLI: mbt-fast bench evidence ----------------------------------------------------------------------
def add_arguments(ap) -> None:
    ap.add_argument("--results", default=None, help="results folder (default: bench/results of the source checkout)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the shipped table differs from the results")


def run(args) -> int:
    results = Path(args.results) if args.results else Path(__file__).resolve().parents[1] / "bench" / "results"
    if not results.is_dir():
        print(f"mbt-fast bench evidence: {results} is not a folder; run from a source checkout or pass --results")
        return 2
    text = json.dumps(build(results), indent=1, sort_keys=True) + "\n"
    if args.check:
        same = TABLE.is_file() and TABLE.read_text() == text
        print(f"{TABLE}: {'matches' if same else 'differs from'} {results}")
        return 0 if same else 1
    TABLE.write_text(text)
    table.cache_clear()
    for key, entry in build(results)["devices"].items():
        print(describe(key, entry))
    print(f"wrote {TABLE}")
    return 0
