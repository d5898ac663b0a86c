"""The report of one ``mbt-fast bench gpu`` run: ``report.md``, ``report.json`` and ``report.png`` from the
files its steps left in the folder (whatever exists: a failed step leaves a gap, said so).

Sections: environment, steps, the training step per backend and batch beside the performance model's
estimate for the nearest modelled GPU (central and [low, high]), model vs measured per op class (from
``profile.csv``), attention and fusion layer per provider (with the SDPA implementation that ran), the
sanitizer, and every row that failed. Measured figures carry their label (GPU measurement, CPU
measurement, interpreter); model figures are labelled model estimate.

    python bench/report.py DIR        # rewrite DIR/report.* from DIR's files
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_LABEL = "model estimate"
COMPILED_MODEL = {"eager_sdpa": "eager_sdpa_compile"}  # perf_model's name of a compiled row


def _csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _f(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _fmt(x, digits: int = 3) -> str:
    v = _f(x)
    return "" if v is None else f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows)]


# ---- the model beside the measurements -------------------------------------------------------------------
def gpu_class_of(env: dict) -> str:
    from mbt_fast.backend_evidence import gpu_class

    cap = tuple(int(x) for x in env["capability"].split(".")) if env.get("capability") else None
    return gpu_class(env.get("gpu") or "", cap)


def model_train(train: list[dict], gpu: str) -> dict:
    """``{(preset, batch): perf_model.estimate(...)["backends"]}`` for every workload the train step ran."""
    from bench.bench_train import config
    from mbt_fast import perf_model

    out = {}
    for preset, batch in sorted({(r["preset"], int(r["batch"])) for r in train if r.get("op") == "train_step"}):
        try:
            est, _, _ = perf_model.estimate(preset, batch, cfg=config(preset))
            out[(preset, batch)] = est["backends"]
        except Exception as e:  # noqa: BLE001  (no model for an unusual preset: the column stays empty)
            out[(preset, batch)] = {"error": str(e)}
    return out


def train_rows(train: list[dict], models: dict, gpu: str) -> list[dict]:
    rows = []
    for r in train:
        compiled = r.get("compile") == "True"
        name = COMPILED_MODEL.get(r["backend"]) if compiled else r["backend"]
        m = models.get((r["preset"], int(r["batch"])), {}).get(name) if name else None
        ms = _f(r.get("median_ms"))
        est = m["est_ms"][gpu] if m else None
        rows.append({"preset": r["preset"], "batch": int(r["batch"]),
                     "backend": r["backend"] + ("+compile" if compiled else ""), "measured_ms": ms,
                     "measurement": r.get("measurement"), "samples_per_s": _f(r.get("samples_per_s")),
                     "peak_mem_mb": _f(r.get("peak_mem_mb")), "speedup_vs_eager_sdpa": _f(r.get("speedup_vs_eager_sdpa")),
                     "sdpa_backend": r.get("sdpa_backend", ""), "status": r["status"], "model_gpu": gpu,
                     "model_ms": est, "model_range_ms": m["est_ms_range"][gpu] if m else None,
                     "measured_over_model": ms / est if ms and est else None})
    return rows


# ---- writing ---------------------------------------------------------------------------------------------
def _pivot(rows: list[dict], keys: list[str]) -> list[str]:
    """One line per shape and mode, one column per provider: median ms (TFLOP/s), or its status."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = []
    shapes = list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))
    body = []
    for shape in shapes:
        cells = []
        for p in providers:
            r = next((x for x in rows if x["provider"] == p and tuple(x[k] for k in keys) == shape), None)
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(f"{_fmt(r['median_ms'])} ({_fmt(r.get('tflops'))})")
            else:
                cells.append(r["status"].split(":")[0])
        body.append([*shape, *cells])
    lines += _table([*keys, *(f"{p} ms (TFLOP/s)" for p in providers)], body)
    used = sorted({(r["provider"], r.get("sdpa_backend", "")) for r in rows if r["status"] == "ok"
                   and r.get("sdpa_backend") not in (None, "", "none")})
    if used:
        lines += ["", "SDPA implementation that ran: " + ", ".join(f"{p}: {b}" for p, b in used) + "."]
    return lines


def markdown(rep: dict) -> str:
    env, label = rep["env"], rep["label"]
    lines = [f"# mbt-fast bench gpu report: {label}", "",
             f"Device: {env.get('gpu') or 'CPU'}" + (f" (sm_{env['capability'].replace('.', '')}, {env.get('sm_count')} SMs, "
                                                     f"{env.get('gpu_memory_gib')} GiB)" if env.get("gpu") else "")
             + f"; driver {env.get('driver')}, CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, torch {env.get('torch')}, "
               f"triton {env.get('triton')}, flash-attn {env.get('flash_attn')}; commit {env.get('commit')}.",
             f"Clocks (MHz): {env.get('clocks_mhz')}; power limit {env.get('power_limit_w')}." if env.get("gpu") else
             "No GPU: every measured figure below is a CPU measurement (or interpreter), not a GPU measurement.",
             f"Model columns: {MODEL_LABEL} for the {rep['model_gpu'].upper()} class (central; [low, high] with every "
             "efficiency at its optimistic / pessimistic end; `mbt_fast/perf_model.py`).", ""]
    lines += ["## Steps", ""] + _table(["step", "status", "seconds", "note"],
                                        [[s["name"], "this report" if s["name"] == "report" else s["status"],
                                          _fmt(s.get("seconds")), s.get("note", "")[:160]] for s in rep["steps"]])
    if rep["train"]:
        lines += ["", "## Training step", ""]
        lines += _table(["preset", "batch", "backend", "measured ms", "samples/s", "peak MB", "× eager_sdpa", "SDPA",
                         "model ms [low, high]", "measured / model", "status"],
                        [[r["preset"], r["batch"], r["backend"], _fmt(r["measured_ms"]), _fmt(r["samples_per_s"]),
                          _fmt(r["peak_mem_mb"]), _fmt(r["speedup_vs_eager_sdpa"]), r["sdpa_backend"],
                          f"{_fmt(r['model_ms'])} [{_fmt(r['model_range_ms'][0])}, {_fmt(r['model_range_ms'][1])}]"
                          if r["model_ms"] else "", _fmt(r["measured_over_model"]), r["status"][:60]] for r in rep["train"]])
    if rep["profile"]:
        first = rep["profile"][0]
        lines += ["", f"## Model vs measured per op class (one training step, {first['preset']}, batch {first['batch']})", "",
                  f"Measured: {first.get('measurement')}, kernel time per class from torch.profiler; "
                  f"model: {MODEL_LABEL}, central.", ""]
        lines += _table(["backend", "op class", "measured ms", "share", "kernels", "model ms", "share", "model bound",
                         "measured / model", "costliest kernel"],
                        [[r["backend"], r.get("op_class", ""), _fmt(r.get("measured_ms")), _fmt(r.get("measured_share"), 2),
                          r.get("kernels", ""), _fmt(r.get("model_ms")), _fmt(r.get("model_share"), 2),
                          r.get("model_dominant", ""), _fmt(r.get("measured_over_model")), r.get("top_kernel", "")[:60]]
                         if r["status"] == "ok" else [r["backend"], "", "", "", "", "", "", "", "", r["status"][:80]]
                         for r in rep["profile"]])
    for key, title in (("attention", "Attention (mbt_attention, packed segments)"), ("block", "Fusion layer")):
        if rep[key]:
            r0 = rep[key][0]
            lines += ["", f"## {title}", "", f"{r0.get('measurement')}, {r0.get('dtype')}; median ms (TFLOP/s).", ""]
            lines += _pivot(rep[key], ["tokens", "batch", "mode"])
    san = rep.get("sanitizer")
    if san:
        lines += ["", "## compute-sanitizer", "", f"{san['label']}.", ""]
        lines += _table(["tool", "status", "summary"], [[t["tool"], t["status"], t.get("summary", "")] for t in san["tools"]])
    failed = [(k, r) for k in ("train", "attention", "block", "profile") for r in rep["raw_failures"].get(k, [])]
    lines += ["", "## Failures", ""]
    lines += [f"- {k}: {r}" for k, r in failed] or ["None: every row that could run here ran."]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> Path | None:
    """Training samples/s per backend and batch; measured vs model ms per op class, per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    ok = [r for r in rep["train"] if r["samples_per_s"]]
    batches = sorted({r["batch"] for r in ok})
    names = list(dict.fromkeys(r["backend"] for r in ok))
    w = 0.8 / max(1, len(batches))
    for j, bsz in enumerate(batches):
        ys = [next((r["samples_per_s"] for r in ok if r["backend"] == n and r["batch"] == bsz), 0) for n in names]
        a.bar([i + j * w for i in range(len(names))], ys, w, label=f"batch {bsz}")
    a.set_xticks([i + w * (len(batches) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel("samples/s")
    a.set_title(f"training step ({ok[0]['measurement'] if ok else 'no rows'})", fontsize=9)
    a.legend(fontsize=7)
    prof = [r for r in rep["profile"] if r["status"] == "ok" and r.get("op_class") not in (None, "", "total")]
    backends = list(dict.fromkeys(r["backend"] for r in prof))
    classes = sorted({r["op_class"] for r in prof})
    cmap = plt.get_cmap("tab20")
    for i, bk in enumerate(backends):
        for k, (col, x) in enumerate((("measured_ms", i - 0.2), ("model_ms", i + 0.2))):
            bottom = 0.0
            for c, cls in enumerate(classes):
                v = next((_f(r[col]) or 0.0 for r in prof if r["backend"] == bk and r["op_class"] == cls), 0.0)
                b.bar(x, v, 0.38, bottom=bottom, color=cmap(c % 20), label=cls if i == 0 and k == 0 else None,
                      hatch="//" if k else None, edgecolor="white")
                bottom += v
    b.set_xticks(range(len(backends)), [f"{bk}\nmeasured | model" for bk in backends], fontsize=8)
    b.set_ylabel("ms per step")
    b.set_title(f"per op class: measured (plain) vs {MODEL_LABEL} (hatched, {rep['model_gpu']} class)", fontsize=9)
    if classes:
        b.legend(fontsize=6, ncol=2)
    fig.suptitle(rep["label"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(out: Path) -> dict:
    """Build the report from ``out``'s files and write ``report.md``, ``report.json`` and ``report.png``."""
    out = Path(out)
    env = _json(out / "env.json") or {}
    label = env.get("label", "unknown")
    gpu = gpu_class_of(env)
    train = _csv(out / "train.csv")
    profile = [{**r, "measured_ms": _f(r.get("measured_ms")), "model_ms": _f(r.get("model_ms"))}
               for r in _csv(out / "profile.csv")]
    rep = {"label": label, "env": env, "model_gpu": gpu, "model_label": MODEL_LABEL,
           "steps": _json(out / "steps.json") or [],
           "train": train_rows(train, model_train(train, gpu), gpu), "profile": profile,
           "attention": _csv(out / "attention.csv"), "block": _csv(out / "block.csv"),
           "sanitizer": _json(out / "sanitizer.json")}
    rep["raw_failures"] = {k: [f"{r.get('backend') or r.get('provider')} {r.get('mode', '')} {r.get('tokens', '')} "
                               f"B={r.get('batch')}: {r['status']}" for r in rows if r["status"].startswith("error")]
                           for k, rows in (("train", train), ("attention", rep["attention"]), ("block", rep["block"]),
                                           ("profile", profile))}
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(rep))
    plot(rep, out / "report.png")
    return rep


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/report.py DIR")
    write(Path(sys.argv[1]))
    print(f"wrote {Path(sys.argv[1]) / 'report.md'}")
