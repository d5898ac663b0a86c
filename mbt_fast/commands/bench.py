"""``mbt-fast bench {attention,block,train,profile,data,gpu,model,evidence}``: the benchmark scripts of ``bench/``,
the one-shot GPU run (``gpu``), the performance model (``mbt_fast.perf_model``, a model estimate that
runs anywhere in seconds) and the table ``auto`` ranks backends by (``evidence``)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_SCRIPTS = {
    "attention": ("bench_attention", "multimodal bottleneck attention: every provider, fwd/bwd/fwd+bwd"),
    "block": ("bench_block", "one fusion layer: reference path vs packed_block per backend"),
    "train": ("bench_train", "one training step per backend, eager and torch.compile"),
    "profile": ("bench_profile", "one profiled training step per backend: time per op class, measured and modelled"),
    "data": ("bench_data", "data loading per core: a VideoDataset item vs decoding every frame (CPU measurement)"),
    "gpu": ("bench_gpu", "the one prepared run for a lent GPU: environment, gpu-marked tests, every benchmark "
                         "(--dry-run: the same on the CPU at tiny sizes)"),
}


def _bench_module(name: str):
    """``bench/<name>.py`` of the source checkout (the scripts are not part of the installed package)."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "bench" / f"{name}.py").is_file():
        raise SystemExit(f"mbt-fast bench: bench/{name}.py not found next to the package ({repo}); "
                         "the benchmarks run from a source checkout")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    return importlib.import_module(f"bench.{name}")


class _LazyScript:
    """Runs a bench script's ``run(args)`` (its arguments were added by ``add_arguments``); an int it
    returns is the exit status, anything else (the rows) means 0."""

    def __init__(self, module: str):
        self.module = module

    def __call__(self, args) -> int:
        rc = _bench_module(self.module).run(args)
        return rc if isinstance(rc, int) else 0


def _run_model(args) -> int:
    from mbt_fast import perf_model

    return perf_model.run(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (measurements) and the performance model (model estimate)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    for cmd, (module, help_) in _SCRIPTS.items():
        sp = bsub.add_parser(cmd, help=help_, description=help_)
        try:
            _bench_module(module).add_arguments(sp)
        except SystemExit as e:  # no source checkout: the sub-command says so when run
            msg = str(e)
            sp.set_defaults(func=lambda args, msg=msg: (print(msg, file=sys.stderr), 2)[1])
            continue
        sp.set_defaults(func=_LazyScript(module))
    mp = bsub.add_parser("model", help="FLOPs, HBM bytes, launches and roofline ms per backend (model estimate)",
                         description="Performance model of one training step per backend (model estimate).")
    from mbt_fast import perf_model

    perf_model.add_arguments(mp)
    mp.set_defaults(func=_run_model)
    help_ = "regenerate the table backend 'auto' ranks by, from bench/results (--check: only compare)"
    ep = bsub.add_parser("evidence", help=help_, description=help_)
    from mbt_fast import backend_evidence

    backend_evidence.add_arguments(ep)
    ep.set_defaults(func=backend_evidence.run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mbt-fast")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)
