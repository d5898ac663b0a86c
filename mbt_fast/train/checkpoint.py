"""Training checkpoints that lose nothing, in one safetensors file, without pickle.

Tensors (model weights, optimizer state tensors, torch RNG states) are safetensors entries; everything
else (step, data position, schedule, optimizer hyper-parameters, python/numpy RNG states, the configs)
is JSON in the file's metadata under ``mbt_fast_trainer``. The file is written to a temporary name,
flushed to disk and ``os.replace``d, so a crash mid-write never leaves a torn checkpoint; SIGINT and
SIGTERM are held during the write and the rename, so a second Ctrl-C cannot cut it short either.

Key prefixes: ``model.<name>``, ``optim.<param index>.<state name>``, ``rng.<name>``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

META_KEY = "mbt_fast_trainer"
FORMAT_VERSION = 1


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


# ---- RNG -----------------------------------------------------------------------------------------
def capture_rng(extra_generators: dict[str, torch.Generator] | None = None) -> tuple[dict, dict]:
    """(tensors, json) describing python, numpy, torch (CPU, CUDA) and extra generators' states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (extra_generators or {}).items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {"python": _jsonable(random.getstate()),
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    for name, g in (extra_generators or {}).items():
        key = f"rng.gen.{name}"
        if key in tensors:
            g.set_state(tensors[key])


# ---- optimizer -------------------------------------------------------------------------------------
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = _jsonable(v)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples (AdamW betas) into lists
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- file ------------------------------------------------------------------------------------------
@contextmanager
def signals_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """Record SIGINT/SIGTERM instead of acting on them, and deliver them to the previous handlers on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed in the main thread
        return
    pending = []
    old = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for sig in pending:
            signal.raise_signal(sig)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- file -----------------------------------------------------------------------------------------
def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, trainer_state: dict,
                    rng_tensors: dict | None = None, rng_meta: dict | None = None) -> Path:
    """Atomically write the checkpoint file ``path``; returns it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "trainer": _jsonable(trainer_state), "rng": rng_meta}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_to_flat(optimizer)
        tensors.update(opt_tensors)
    tensors.update({k: v.contiguous().cpu() for k, v in (rng_tensors or {}).items()})
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with signals_held():
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        _fsync(tmp)  # the data reaches the disk before the rename makes it the checkpoint
        os.replace(tmp, path)
        _fsync(path.parent)
    return path


def read_checkpoint(path, with_tensors: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint; only safetensors and JSON are parsed (no pickle).
    ``with_tensors=False`` reads the metadata alone (the tensors dict is empty)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path}: {what}; expected a checkpoint.safetensors written by mbt-fast train")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()} if raw is not None and with_tensors else {}
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise ValueError(f"{path}: not a readable safetensors file (truncated, empty or another format?): {e}") from None
    if raw is None:
        raise ValueError(f"{path}: not an mbt_fast training checkpoint (no {META_KEY} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {META_KEY} metadata is not valid JSON: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return tensors, meta


def model_state(tensors: dict) -> dict:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def load_model_from_checkpoint(path, backend: str = "torch"):
    """An ``mbt_fast.MBT`` (eval mode) with the weights and model config of a training checkpoint."""
    from mbt_fast import MBT, MBTConfig

    tensors, meta = read_checkpoint(path)
    cfg = MBTConfig.from_scenic(meta["trainer"]["model_config"])
    model = MBT(cfg, backend=backend)
    model.load_state_dict(model_state(tensors), strict=True)
    return model.eval()
