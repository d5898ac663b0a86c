"""The one-shot GPU command: environment, ``gpu``-marked tests and every benchmark in one prepared run.

A lent GPU comes rarely and briefly (one command of at most 10 minutes), so this runs everything in
about 8 minutes on an H100/H200 and writes as it goes: ``env.json`` first, then each step's files as
soon as the step ends, and ``summary.md`` (status ok/failed and seconds per step) rewritten after
every step. Steps: the CUDA build, the ``gpu`` tests, ``compute-sanitizer`` on a small CUDA step,
attention and fusion layer per provider, the training step at batch 8 and 32, one profiled step per
backend (time per op class), and the report (``report.md``, ``report.json``, ``report.png``: see
``bench/report.py``). Each step runs in its own subprocess with a time budget: a timeout, a crash or a
CUDA fault that poisons its process loses that step only. Commit the folder under ``bench/results/<gpu>/``.

``--dry-run`` runs the same steps on the CPU at tiny sizes (Triton under its interpreter), labelled
"CPU dry run — not a GPU measurement", so a bug in the command shows before a GPU is spent on it.

    mbt-fast bench gpu --out bench/results/nvidia_h200/run1          # on the GPU machine
    mbt-fast bench gpu --out /tmp/gpu_dry --dry-run                  # anywhere, ~3 minutes (+2 the first time)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import bench_attention, bench_block, common, report

DRY_LABEL = "CPU dry run — not a GPU measurement"
NO_GPU = "no CUDA device visible; use --dry-run to check the command on the CPU"
STEPS = ("env", "build_cuda", "pytest_gpu", "sanitizer", "attention", "block", "train", "profile", "report")


class Step:
    """One step of the run: a subprocess with a time budget, its log, and the files it must write."""

    def __init__(self, name: str, budget_s: float, cmd: list[str] | None, outputs: list[str], env: dict | None = None,
                 fn=None):
        self.name, self.budget_s, self.cmd, self.outputs, self.env = name, budget_s, cmd, outputs, env
        self.fn = fn  # in-process steps (env, report): no subprocess, budget not enforced
        self.status, self.seconds, self.note = "pending", None, ""


# ---- the steps ----------------------------------------------------------------------------------------
def step_environ(dry_run: bool) -> dict:
    """Variables every step runs with. The tests' conftest turns the Triton interpreter on unless told
    otherwise: on a GPU, tell it otherwise."""
    return {"TRITON_INTERPRET": "1" if dry_run else "0"}


def plan(out: Path, dry_run: bool, quick: bool) -> list[Step]:
    """The steps and their budgets. GPU budgets sum to 8 minutes. The dry run takes ~3 minutes, plus ~2 the
    first time, when its build step compiles the CPU emulation."""
    py = sys.executable
    bench = [py, str(common.REPO / "bench" / "bench_{}.py")]
    env = step_environ(dry_run)
    half = (lambda n: str(max(1, n // 2))) if quick else str
    if dry_run:
        cpu = ["--device", "cpu", "--warmup", "0", "--reps", "2", "--interpreter", "--out", str(out)]
        attention = ["--tokens", "5,9", "--batch", "2", "--n-bottleneck", "2", *cpu]
        block = ["--tokens", "5,9", "--batch", "1", "--hidden", "32", "--heads", "1", "--mlp-dim", "64",
                 "--n-bottleneck", "2", *cpu]
        train = ["--preset", "tiny", "--batch", "2", "3", *cpu]  # compile rows say "skipped" on a CPU (minutes of C++)
        profile = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--interpreter", "--out", str(out)]
        sanitizer = ["--dry-run"]
        # the CPU emulation the sanitizer's dry run executes: ~110 s from scratch (220 s seen on a loaded
        # runner), ~7 s cached
        build = ["--emu"]
        # budgets catch a hang, with room for a busy 2-core machine (a CI runner): the steps take
        # ~110-180 s in all once the emulation is built, and about twice that under load
        budgets = dict(env=10, build_cuda=420, pytest_gpu=45, sanitizer=40, attention=60, block=60, train=140,
                       profile=60, report=0)
    else:
        # MBT-B shapes; fewer shapes than the scripts' GPU sweep so that all of it fits the budget
        attention = ["--tokens", "401,3137", "101,401", "--batch", "1", "8", "--reps", half(30), "--out", str(out)]
        block = ["--tokens", "401,3137", "--batch", "1", "8", "--reps", half(20), "--out", str(out)]
        # batch 8 and 32; compiled: eager_sdpa only (the baseline a user would compile; each compile of
        # MBT-B costs tens of seconds, and eager rows of every batch come first)
        train = ["--preset", "mbt_base_16x2", "--batch", "8", "32", "--reps", half(20), "--max-seconds", "4",
                 "--compile-backends", "eager_sdpa", "--out", str(out)]
        profile = ["--preset", "mbt_base_16x2", "--batch", "8", "--out", str(out)]
        sanitizer = ["--budget-s", "25"]  # per tool: torch's start under memcheck is slow
        build = []
        # attention: +20 s for triton_autotune's candidates (8 compiles and timings per dtype)
        budgets = dict(env=10, build_cuda=95, pytest_gpu=90, sanitizer=55, attention=80, block=35, train=90,
                       profile=25, report=0)  # 480 s
    # -v: a run killed at its budget writes no junit xml, but its log still names every test that finished
    pytest = [py, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rs", "--durations=10",
              f"--junitxml={out / 'pytest_gpu.xml'}", "tests"]
    # explicit provider lists, so that a failed build can drop "cuda" from them (see run)
    attention = ["--providers", *bench_attention.PROVIDERS, *attention]
    block = ["--providers", *bench_block.PROVIDERS, *block]
    return [  # env and report run in this process (budgets not enforced); mbt-fast info has its own timeout
        Step("env", budgets["env"], None, ["env.json"], fn=lambda: step_env(out, dry_run, quick)),
        Step("build_cuda", budgets["build_cuda"], [py, "-m", "mbt_fast.cli", "build", "cuda", *build], [], env),
        Step("pytest_gpu", budgets["pytest_gpu"], pytest, ["pytest_gpu.xml"], env),
        Step("sanitizer", budgets["sanitizer"], [bench[0], str(common.REPO / "bench" / "sanitize_cuda.py"), "--out",
                                                 str(out), *sanitizer], ["sanitizer.json"], env),
        Step("attention", budgets["attention"], [bench[0], bench[1].format("attention"), *attention], ["attention.csv"], env),
        Step("block", budgets["block"], [bench[0], bench[1].format("block"), *block], ["block.csv"], env),
        Step("train", budgets["train"], [bench[0], bench[1].format("train"), "--backends", "reference", "eager_sdpa",
                                         "torch", "triton", "cuda", *train], ["train.csv"], env),
        Step("profile", budgets["profile"], [bench[0], bench[1].format("profile"), *profile], ["profile.csv"], env),
        Step("report", budgets["report"], None, ["report.md", "report.json"], fn=lambda: report.write(out)),
    ]


def run_subprocess(step: Step, out: Path) -> None:
    """Run ``step.cmd`` with its log in ``out/<name>.log``; kill its whole process group at the budget
    (torch.compile starts worker processes that a plain kill would leave behind)."""
    with open(out / f"{step.name}.log", "w") as log:
        log.write(f"$ {' '.join(step.cmd)}\n")
        log.flush()
        proc = subprocess.Popen(step.cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(step.env or {})}, start_new_session=True)
        try:
            rc = proc.wait(timeout=step.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"timed out after its budget of {step.budget_s:.0f} s (see {step.name}.log)")
    if rc != 0:
        raise RuntimeError(f"exit status {rc}: {_last_line(out / f'{step.name}.log')}")


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def describe(step: Step, out: Path) -> str:
    """A one-line account of what a finished step wrote: row statuses of a CSV, test counts of the xml."""
    notes = []
    for name in step.outputs:
        path = out / name
        if name.endswith(".csv") and path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            counts = {}
            for r in rows:
                key = r["status"].split(":")[0]
                counts[key] = counts.get(key, 0) + 1
            notes.append(f"{len(rows)} rows (" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")")
        elif name.endswith(".xml") and path.is_file():
            suite = ET.parse(path).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            notes.append(f"{a['tests']} tests: {a['tests'] - a['failures'] - a['errors'] - a['skipped']} passed, "
                         f"{a['failures']} failed, {a['errors']} errors, {a['skipped']} skipped")
    return "; ".join(notes)


# ---- the environment ----------------------------------------------------------------------------------
def environment(dry_run: bool, quick: bool) -> dict:
    cuda = torch.cuda.is_available() and not dry_run
    env = {"label": DRY_LABEL if dry_run else "GPU measurement", "dry_run": dry_run, "quick": quick,
           "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": common.git_commit(), "commit_full": _git("rev-parse", "HEAD"),
           "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
           "triton": common.version("triton"), "flash_attn": common.version("flash-attn"),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_slug=common.device_slug(torch.device("cuda")),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   device_count=torch.cuda.device_count(), driver=_nvidia_smi("driver_version"),
                   clocks_mhz={f: _nvidia_smi(f"clocks.{f}") for f in ("sm", "max.sm", "mem", "max.mem")},
                   power_limit_w=_nvidia_smi("power.limit"),
                   cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:
        env.update(gpu=None, note="no GPU used: every figure of this run is a " + DRY_LABEL)
    return env


def _git(*args: str) -> str:
    try:
        r = subprocess.run(["git", "-C", str(common.REPO), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nvidia_smi(field: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def step_env(out: Path, dry_run: bool, quick: bool) -> None:
    """env.json before anything else can fail, then again with ``mbt-fast info`` (a subprocess: seconds;
    run with the steps' environment variables, so that it says what the steps will see)."""
    env = environment(dry_run, quick)
    _write_json(out / "env.json", env)
    try:
        r = subprocess.run([sys.executable, "-m", "mbt_fast.cli", "info"], cwd=common.REPO, capture_output=True,
                           text=True, timeout=20, env={**os.environ, **step_environ(dry_run)})
        env["mbt_fast_info"] = (r.stdout + r.stderr).splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        env["mbt_fast_info"] = [f"mbt-fast info failed: {common.short_error(e)}"]
    _write_json(out / "env.json", env)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # a reader (or a kill) never sees half a file


# ---- summary ------------------------------------------------------------------------------------------
def write_summary(out: Path, steps: list[Step], label: str, env: dict) -> None:
    where = env.get("gpu") or "CPU"
    lines = [f"# mbt-fast bench gpu: {label}", "",
             f"Device: {where}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('torch_cuda')}, "
             f"driver {env.get('driver')}; commit {env.get('commit')}; started {env.get('started_utc')}.",
             f"Every figure in this folder is a {label}." if env.get("dry_run") else
             "Figures in this folder are GPU measurements on the device above (see each CSV's `measurement`).", "",
             "| step | status | seconds | budget s | files | note |", "| --- | --- | --- | --- | --- | --- |"]
    for s in steps:
        secs = f"{s.seconds:.1f}" if s.seconds is not None else ""
        files = ", ".join(s.outputs + ([f"{s.name}.log"] if s.cmd and s.status != "pending" else []))
        lines.append(f"| {s.name} | {s.status} | {secs} | {s.budget_s:.0f} | {files} | {s.note.replace('|', '/')} |")
    total = sum(s.seconds or 0 for s in steps)
    lines += ["", f"Total {total:.1f} s of a {sum(s.budget_s for s in steps):.0f} s budget."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _write_json(out / "steps.json", [{"name": s.name, "status": s.status, "seconds": s.seconds, "budget_s": s.budget_s,
                                      "note": s.note} for s in steps])  # what the report step reads


# ---- CLI ----------------------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", required=True, help="results folder; commit it under bench/results/<gpu>/")
    ap.add_argument("--dry-run", action="store_true", help=f"the same steps on the CPU at tiny sizes ({DRY_LABEL})")
    ap.add_argument("--quick", action="store_true", help="half the timed repetitions")


def run(args) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        print(f"mbt-fast bench gpu: {NO_GPU}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    label = DRY_LABEL if args.dry_run else "GPU measurement"
    steps = plan(out, args.dry_run, args.quick)
    env = {"dry_run": args.dry_run}
    print(f"mbt-fast bench gpu ({label}): {len(steps)} steps, budget {sum(s.budget_s for s in steps):.0f} s, "
          f"writing {out}", flush=True)
    cuda_built = True
    for s in steps:
        write_summary(out, steps, label, env)
        if not cuda_built and s.cmd and "cuda" in s.cmd:  # a provider/backend list naming cuda
            s.note = "cuda dropped: the build failed"  # a JIT build per step would eat every later budget
            s.cmd = [a for a in s.cmd if a != "cuda"]
        t0 = time.perf_counter()
        try:
            if s.fn is not None:
                s.fn()
                if s.name == "env":
                    env = json.loads((out / "env.json").read_text())
            else:
                run_subprocess(s, out)
            missing = [f for f in s.outputs if not (out / f).is_file()]
            if missing:
                raise RuntimeError(f"did not write {', '.join(missing)}")
            s.status = "ok"
        except Exception as e:  # noqa: BLE001  (one failing step must not lose the others)
            s.status = "failed"
            s.note = (s.note + "; " if s.note else "") + common.short_error(e, 200)
            cuda_built = cuda_built and s.name != "build_cuda"
        s.seconds = time.perf_counter() - t0
        try:
            d = describe(s, out)
            s.note = "; ".join(x for x in (s.note, d) if x)
        except Exception as e:  # noqa: BLE001  (an unreadable partial file: say so, go on)
            s.note += f"; output unreadable: {common.short_error(e)}"
        print(f"[{s.name}] {s.status} ({s.seconds or 0:.1f} s) {s.note}", flush=True)
    write_summary(out, steps, label, env)
    print(f"wrote {out / 'summary.md'}")
    if not args.dry_run:
        print(f"commit it: git add {out} (under bench/results/{env.get('gpu_slug', 'gpu')}/)")
    return 1 if any(s.status == "failed" for s in steps) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
