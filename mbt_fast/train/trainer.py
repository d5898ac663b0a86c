"""The training loop: Scenic's MBT recipe, exact resume, DDP through torchrun.

Defaults follow ``balanced_audioset_base.py`` (SCENIC_MBT.md section 4): SGD momentum 0.9, base lr 0.5
at batch 64 scaled linearly with the global batch, compound schedule (linear warmup over 5 % of the
steps -- Scenic's 2.5 of 50 epochs -- then cosine), global grad-norm clip 1.0, label smoothing 0.3,
mixup alpha 0.5, SpecAugment, stochastic depth 0.3 (a model-config field). AdamW is selectable.

Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the model is wrapped in
DistributedDataParallel, the data in a DistributedSampler, rank 0 logs and writes checkpoints. The
gradient is clipped after DDP's all-reduce (Scenic clips each device's gradient before its pmean).

Fine-tuning: ``train(..., init_from=model)`` starts a new run from another model's matching tensors
(:mod:`mbt_fast.train.finetune`); ``TrainConfig.freeze_backbone`` trains the classifier alone.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mbt_fast.data.augment import mixup, sample_mixup_lambda
from mbt_fast.data.dataset import collate_skip_bad
from mbt_fast.data.sampler import ResumableSampler, eval_sampler
from mbt_fast.train import checkpoint as ckpt
from mbt_fast.train import finetune
from mbt_fast.train.losses import classification_loss
from mbt_fast.train.metrics import mean_average_precision, precision_at_1, topk_accuracy
from mbt_fast.train.run_dir import CHECKPOINT_NAME, RunFolderError, RunFolderLocked, claim_run_dir, repair_jsonl
from mbt_fast.train.schedule import compound_lr

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything about a run that is not the model config (stored in checkpoints as JSON)."""
    out_dir: str = "runs/mbt"
    steps: int = 1000
    batch_size: int = 64                 # global, split over ranks
    optimizer: str = "sgd"               # "sgd" (Scenic's momentum) | "adamw"
    lr: float = 0.5                      # sgd: at batch 64, scaled by batch_size / 64; adamw: used as is
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = None      # None: 5 % of steps
    grad_clip: float = 1.0               # 0 disables
    label_smoothing: float = 0.3
    mixup_alpha: float = 0.5             # 0 disables
    seed: int = 0
    backend: str = "torch"
    compile: bool = False                # torch.compile(fullgraph=True) of the training forward/backward
    device: str = "auto"                 # "auto": cuda if available (cuda:LOCAL_RANK under torchrun)
    num_workers: int | str = "auto"      # DataLoader workers; "auto": this process's cores (resolve_num_workers)
    prefetch_factor: int = 2             # batches each worker loads ahead (workers > 0)
    ckpt_every: int = 500                # 0: only at the end / on a signal
    eval_every: int = 0                  # 0: only at the end (when there is a validation set)
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    stop_after: int | None = None        # stop (checkpointing) after this many steps of *this* run
    max_nonfinite: int = 3               # stop after this many consecutive steps with a non-finite loss/gradient
    freeze_backbone: bool = False        # train the classifier alone (linear probing); the rest keeps its weights
    run_args: dict = field(default_factory=dict)  # what else defines the run (preset, data); a resume must match
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("steps", "batch_size", "log_every", "max_nonfinite"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                fail(name, "an integer >= 1")
        for name in ("ckpt_every", "eval_every", "seed"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "an integer >= 0")
        if not (self.num_workers == "auto" or (is_int(self.num_workers) and self.num_workers >= 0)):
            fail("num_workers", "'auto' or an integer >= 0")
        if not (is_int(self.prefetch_factor) and self.prefetch_factor >= 1):
            fail("prefetch_factor", "an integer >= 1")
        if self.stop_after is not None and not (is_int(self.stop_after) and self.stop_after >= 1):
            fail("stop_after", "None or an integer >= 1")
        if self.warmup_steps is not None and not (is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps):
            fail("warmup_steps", f"None or an integer in [0, steps={self.steps}]")
        if self.optimizer not in ("sgd", "adamw"):
            fail("optimizer", "'sgd' or 'adamw'")
        if not (is_real(self.lr) and self.lr > 0):
            fail("lr", "a finite number > 0")
        for name in ("momentum", "label_smoothing"):
            if not (is_real(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                fail(name, "a number in [0, 1)")
        for name in ("weight_decay", "grad_clip", "mixup_alpha"):  # grad_clip, mixup_alpha: 0 disables
            if not (is_real(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "a finite number >= 0")
        if not (len(self.betas) == 2 and all(is_real(b) and 0 <= b < 1 for b in self.betas)):
            fail("betas", "two numbers in [0, 1)")
        if not isinstance(self.freeze_backbone, bool):
            fail("freeze_backbone", "True or False")

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 64 if self.optimizer == "sgd" else self.lr

    def warmup(self) -> int:
        return int(round(0.05 * self.steps)) if self.warmup_steps is None else self.warmup_steps


MAX_AUTO_WORKERS = 8
DATA_WAIT_WINDOW = 50        # steps over which the data-wait fraction is judged
DATA_WAIT_WARN = 0.2         # warn once when the loader's share of the step time exceeds this


def resolve_num_workers(num_workers: int | str) -> int:
    """``"auto"``: the cores this process may run on (its affinity mask, not the machine's count), shared
    among the ranks of this node, capped at ``MAX_AUTO_WORKERS``; an int is taken as is."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_WORKERS, per_rank))


def _worker_init(worker_id: int) -> None:
    # one worker = one core: intra-op threads in every worker would oversubscribe the machine
    # (PyAV decodes with one thread already, see mbt_fast.data.video._open)
    torch.set_num_threads(1)


def make_loader(dataset, batch_size: int, sampler, num_workers: int, prefetch_factor: int, pin_memory: bool,
                drop_last: bool = False, persistent: bool = True, generator=None) -> DataLoader:
    """A DataLoader of collated batches. The order is the sampler's alone (it runs in this process and
    hands each example its seed), so results do not depend on ``num_workers``."""
    extra = dict(persistent_workers=persistent, prefetch_factor=prefetch_factor,
                 worker_init_fn=_worker_init) if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_bad, drop_last=drop_last, generator=generator,
                      pin_memory=pin_memory, **extra)


def _stop_workers(loader: DataLoader) -> None:
    """End persistent workers now: left to the garbage collector (which an exception's traceback delays)
    they would outlive the run, holding memory and the files they inherited."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


class DataWait:
    """Time spent waiting for batches vs computing, over the last ``window`` steps; warns once when the
    data wait exceeds ``DATA_WAIT_WARN`` of the step time."""

    def __init__(self, window: int, num_workers: int):
        import collections

        self.window, self.num_workers = window, num_workers
        self.recent: collections.deque = collections.deque(maxlen=window)
        self.warned = False

    def add(self, data_s: float, step_s: float) -> None:
        self.recent.append((data_s, step_s))
        if not self.warned and len(self.recent) == self.window and self.fraction() > DATA_WAIT_WARN:
            self.warned = True
            log.warning("the training loop waited for data %.0f%% of the step time over the last %d steps: the "
                        "loader cannot keep up. Fix: more --num-workers (now %d; 'auto' uses this process's cores), "
                        "or decode the videos once with `mbt-fast prepare` and train with --prepared DIR",
                        100 * self.fraction(), self.window, self.num_workers)

    def fraction(self) -> float:
        data = sum(d for d, _ in self.recent)
        total = data + sum(s for _, s in self.recent)
        return data / total if total > 0 else 0.0


# ---- distributed -------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); the process group is joined when torchrun's variables say so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class _PerModality(torch.nn.Module):
    """DDP hooks only ``forward``: route it to ``forward_per_modality`` so gradients get all-reduced."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model.forward_per_modality(**inputs)


# ---- helpers -----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.scaled_lr(), momentum=tc.momentum, weight_decay=tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.scaled_lr(), betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {tc.optimizer!r}")


def model_inputs(batch: dict, modalities, device) -> dict:
    """The model's keyword arguments from a batch: each modality, and the ``lengths`` of ragged feature
    sequences the dataset reports (``<modality>_length``, from sidecar files of unequal length)."""
    out = {m: batch[m].to(device, non_blocking=True) for m in modalities}
    lengths = {m: batch[f"{m}_length"].to(device, non_blocking=True) for m in modalities if f"{m}_length" in batch}
    if lengths:
        out["lengths"] = lengths
    return out


@torch.no_grad()
def evaluate(model, dataset, multi_label: bool, batch_size: int = 32, device="cpu", num_workers: int = 0,
             rank: int = 0, world: int = 1) -> dict:
    """Eval-mode metrics on ``dataset``; items with a clip axis (multi-clip test) get their raw logits
    averaged over clips (Scenic). mAP (multi-label) or top-1/top-5 (single label), plus the loss."""
    was_training = model.training
    model.eval()
    mods = model.cfg.modality_fusion
    loader = make_loader(dataset, batch_size, eval_sampler(dataset, world, rank), num_workers, prefetch_factor=2,
                         pin_memory=torch.device(device).type == "cuda", persistent=False)
    logits_all, labels_all, skipped = [], [], 0
    for batch in loader:
        skipped += batch["num_skipped"]
        if "label" not in batch:
            continue
        inputs = model_inputs(batch, mods, device)
        multi_clip = inputs[mods[0]].dim() == len(model.cfg.input_shape(mods[0])) + 2
        if multi_clip:
            b, k = inputs[mods[0]].shape[:2]
            lengths = inputs.pop("lengths", None)
            inputs = {m: x.flatten(0, 1) for m, x in inputs.items()}
            if lengths:  # one length per file, the same for each of its clips
                inputs["lengths"] = {m: n.repeat_interleave(k) for m, n in lengths.items()}
        with _autocast(device):
            out = model(**inputs).float()
        if multi_clip:
            out = out.view(b, k, -1).mean(1)
        logits_all.append(out.cpu())
        labels_all.append(batch["label"])
    n_cls = model.cfg.num_classes
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, n_cls)
    labels = torch.cat(labels_all) if labels_all else torch.zeros(0, n_cls)
    if world > 1:  # gather the shards (padded to one length) on every rank
        n = torch.tensor([len(logits)])
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        m = int(max(s.item() for s in sizes))
        pad = lambda x: torch.cat([x, x.new_zeros(m - len(x), n_cls)])  # noqa: E731
        gl = [torch.zeros(m, n_cls) for _ in range(world)]
        gy = [torch.zeros(m, n_cls) for _ in range(world)]
        dist.all_gather(gl, pad(logits))
        dist.all_gather(gy, pad(labels))
        logits = torch.cat([g[:int(s)] for g, s in zip(gl, sizes)])
        labels = torch.cat([g[:int(s)] for g, s in zip(gy, sizes)])
        skipped = int(_all_reduce(torch.tensor([skipped])).item())
    model.train(was_training)
    res = {"num_examples": len(logits), "num_skipped": skipped}
    if len(logits) == 0:
        return res
    res["loss"] = float(classification_loss(logits, labels, multi_label))
    y, s = labels.numpy(), logits.numpy()
    if multi_label:
        res["mAP"] = mean_average_precision(y, s)
        res["prec@1"] = precision_at_1(y, s)
    else:
        res["accuracy"] = topk_accuracy(y, s, 1)
        res["top5"] = topk_accuracy(y, s, 5)
    return res


def _autocast(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()  # bf16 autocast on GPU only; CPU runs fp32


def plot_curves(out_dir) -> Path | None:
    """``out_dir/curves.png`` from metrics.jsonl (loss, lr) and eval.jsonl (held-out metrics)."""
    out_dir = Path(out_dir)
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (out_dir / "metrics.jsonl").exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [json.loads(x) for x in (out_dir / "eval.jsonl").read_text().splitlines() if x.strip()] \
        if (out_dir / "eval.jsonl").exists() else []
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(13 if evals else 9, 3.5))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], lw=0.8)
    axes[0].set(xlabel="step", ylabel="train loss", title="loss")
    axes[1].plot(steps, [r.get("lr", float("nan")) for r in rows])
    axes[1].set(xlabel="step", ylabel="lr", title="learning rate")
    if evals:
        for key in ("accuracy", "mAP", "top5"):
            pts = [(e["step"], e[key]) for e in evals if key in e]
            if pts:
                axes[2].plot(*zip(*pts), marker="o", label=key)
        axes[2].set(xlabel="step", title="held-out")
        axes[2].legend()
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class _StopFlag:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, return (installed in the main thread only)."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C really stops
        self.set = True
        log.warning("got %s: checkpointing after the current step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


COMPILE_CLEAN_BACKENDS = ("reference", "eager_sdpa", "torch", "cuda", "cuda-emu")


# ---- resume checks ------------------------------------------------------------------------------------
# TrainConfig fields a resume may change: they do not change what the run computes, or (steps) extend it
SAFE_TO_CHANGE = ("steps", "log_every", "num_workers", "prefetch_factor", "ckpt_every", "eval_every", "backend", "compile", "device",
                  "max_nonfinite")
PER_INVOCATION = ("out_dir", "stop_after", "progress", "plot", "extra")  # not part of the run


def _plain(x):
    return json.loads(json.dumps(ckpt._jsonable(x)))  # the form the checkpoint stores (tuples -> lists)


def resume_changes(saved_tc: dict, tc: TrainConfig, saved_model: dict, model_cfg, step: int):
    """(refused, applied): one ``name: old -> new`` line per argument that differs from the checkpoint's."""
    new, defaults = _plain(dataclasses.asdict(tc)), _plain(dataclasses.asdict(TrainConfig()))
    refused, applied = [], []
    for name, value in new.items():
        if name in PER_INVOCATION:
            continue
        if name == "run_args":
            if name not in saved_tc:
                log.warning("the checkpoint predates run_args: the preset and data arguments cannot be checked")
                continue
            old = saved_tc[name]
            refused += [f"{k}: {old.get(k)!r} -> {value.get(k)!r}" for k in sorted(set(old) | set(value))
                        if old.get(k) != value.get(k)]
            continue
        old = saved_tc.get(name, defaults[name])
        if old == value:
            continue
        line = f"{name}: {old!r} -> {value!r}"
        if name == "steps" and value < step:
            refused.append(f"{line} (below the checkpoint's step {step})")
        elif name == "steps":
            applied.append(f"{line} (the warmup + cosine schedule now spans {value} steps)")
        else:
            (applied if name in SAFE_TO_CHANGE else refused).append(line)
    saved_model, new_model = _plain(saved_model), _plain(model_cfg.to_dict())
    refused += [f"model_config.{k}: {saved_model.get(k)!r} -> {new_model.get(k)!r}"
                for k in sorted(set(saved_model) | set(new_model)) if saved_model.get(k) != new_model.get(k)]
    return refused, applied


def _last_step(path: Path):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return json.loads(lines[-1]).get("step") if lines else None


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on any (a no-op without a process group)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    return bool(_all_reduce(t, dist.ReduceOp.MAX).item())


class NonFiniteError(RuntimeError):
    """The loss or the gradient stayed non-finite for ``max_nonfinite`` consecutive steps."""


def _nonfinite_message(tc, step, loss, gnorm, bad_inputs, last_ckpt, base_lr) -> str:
    saved = (f"the last finite checkpoint is {last_ckpt[0]} (step {last_ckpt[1]})" if last_ckpt
             else "no checkpoint was written before it")
    causes = []
    if bad_inputs:
        causes.append(f"bad data: the last batch's {', '.join(bad_inputs)} input holds NaN/Inf values (a bad "
                      f"normalisation such as --spec-std 0, or bad files)")
    causes += [f"the learning rate is too high (lr {tc.lr}, {base_lr:g} after batch scaling)",
               "a bad input normalisation (e.g. --spec-std near 0)", "bad data (NaN/Inf values in the inputs)"]
    return (f"training stopped at step {step}: the loss or the gradient was not finite for {tc.max_nonfinite} "
            f"consecutive steps (--max-nonfinite {tc.max_nonfinite}; last loss {loss:g}, grad norm {gnorm:g}); "
            f"those steps did not update the parameters; {saved}. Likely causes: " + "; ".join(causes))


# ---- the loop ---------------------------------------------------------------------------------------
def train(tc: TrainConfig, model_cfg, train_dataset, val_dataset=None, resume: bool = False,
          overwrite: bool = False, model: torch.nn.Module | None = None, on_step=None,
          init_from: torch.nn.Module | None = None, init_name: str = "the source model") -> dict:
    """Train ``mbt_fast.MBT(model_cfg)`` (or ``model``) for ``tc.steps`` steps; returns a summary dict.

    ``train_dataset``/``val_dataset`` yield the item dicts of :mod:`mbt_fast.data` and have a
    ``multi_label`` attribute. The run folder ``tc.out_dir`` is locked for the run; a folder holding
    another run is refused unless ``resume`` (continue it from its checkpoint, which must exist and match
    this run's arguments) or ``overwrite`` (move it aside to ``<out>.old-<timestamp>``).
    ``on_step(step, record)`` is called after every step (tests use it).
    ``init_from``: a model whose tensors of matching name and shape initialise a new run (the rest keeps
    its fresh initialisation; the report is logged, naming ``init_name``); a resume ignores it, its
    weights come from the run's checkpoint.
    """
    rank, world, local_rank = dist_info()
    if tc.batch_size % world:
        raise ValueError(f"batch_size ({tc.batch_size}) must be divisible by the number of processes ({world})")
    if tc.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lock = error = None
    if rank == 0:  # rank 0 owns the folder; the others write nothing there
        try:
            lock = claim_run_dir(tc.out_dir, resume=resume, overwrite=overwrite)
        except (RunFolderError, RunFolderLocked) as e:
            error = e
    if _any_rank(error is not None, device) and error is None:
        raise RunFolderError(f"rank 0 could not claim the run folder {tc.out_dir} (see its message)")
    if error is not None:
        raise error
    try:
        return _train(tc, model_cfg, train_dataset, val_dataset, resume, model, on_step, device, rank, world,
                      init_from, init_name)
    finally:
        if lock is not None:
            lock.release()


def _train(tc, model_cfg, train_dataset, val_dataset, resume, model, on_step, device, rank, world,
           init_from=None, init_name="the source model") -> dict:
    import mbt_fast

    out = Path(tc.out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    multi_label = bool(getattr(train_dataset, "multi_label", False))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "num_skipped": 0, "num_audio_missing": 0,
             "train_seconds": 0.0, "num_nonfinite": 0, "nonfinite_streak": 0}

    tensors = meta = None
    if resume:
        tensors, meta = ckpt.read_checkpoint(ckpt_path)
        saved = meta["trainer"]
        saved_cfg = mbt_fast.MBTConfig.from_scenic(saved["model_config"])
        refused, applied = resume_changes(saved.get("train_config", {}), tc, saved_cfg.to_dict(),
                                          model.cfg if model is not None else model_cfg, saved["step"])
        n_saved = saved.get("train_examples")
        if n_saved is not None and n_saved != len(train_dataset):
            refused.append(f"len(train_dataset): {n_saved} -> {len(train_dataset)}")
        if refused:
            raise RunFolderError(f"--resume: the checkpoint {ckpt_path} (step {saved['step']}) was made with other "
                                 f"arguments, and these changes would alter the run:\n  " + "\n  ".join(refused) +
                                 "\nresume with the original arguments, or start a new run (another --out, or "
                                 "--overwrite)")
        if applied and rank == 0:
            log.warning("--resume: applying changed arguments that are safe to change: %s", "; ".join(applied))
        model_cfg = saved_cfg
    seed_everything(tc.seed + rank)
    if model is None:
        model = mbt_fast.MBT(model_cfg, backend=tc.backend)
    model_cfg = model.cfg
    model.to(device).train()
    if init_from is not None and not resume:
        report = finetune.init_from(model, init_from)
        if rank == 0:
            log.info("%s", finetune.format_report(report, init_name))
    elif init_from is not None and rank == 0:
        log.info("--resume: the weights come from the run's checkpoint, not from %s", init_name)
    if tc.freeze_backbone:
        finetune.freeze_backbone(model)
    # frozen parameters stay out of the optimizer (no update, no weight decay, no state) and of the clip
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        n_all, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)
        log.info("%s of %s parameters are trainable%s", f"{n_train:,}", f"{n_all:,}",
                 " (--freeze-backbone: the classifier alone)" if tc.freeze_backbone else "")
    optimizer = build_optimizer(trainable, tc)
    mixup_gen = torch.Generator().manual_seed(tc.seed * 1000003 + 17)
    last_ckpt = None  # (path, step) of the newest checkpoint of this run
    if resume:
        model.load_state_dict(ckpt.model_state(tensors), strict=True)
        ckpt.optimizer_from_flat(optimizer, tensors, meta["optimizer"])
        state.update({k: meta["trainer"].get(k, v) for k, v in state.items()})
        last_ckpt = (ckpt_path, state["step"])
        saved_world = meta["trainer"].get("world_size", 1)
        rng_t = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        if saved_world == world:
            # per-rank torch states were gathered into rng.torch.rank<r>
            rng_t["rng.torch"] = rng_t.get(f"rng.torch.rank{rank}", rng_t["rng.torch"])
            ckpt.restore_rng(rng_t, meta["rng"], {"mixup": mixup_gen})
        else:
            log.warning("resuming a %d-process run with %d processes: the run continues, but its data order and RNG streams differ from an uninterrupted one",
                        saved_world, world)
            seed_everything(tc.seed + rank + 7919 * state["step"])
        if rank == 0:
            repair_jsonl(out / "metrics.jsonl", state["step"])
            repair_jsonl(out / "eval.jsonl", state["step"])
            log.info("resumed from %s at step %d", ckpt_path, state["step"])
        del tensors
    # rank 0 reads the folder; every rank must take the same branch
    eval_done = _any_rank(rank == 0 and _last_step(out / "eval.jsonl") == state["step"], device)
    finished = state["step"] >= tc.steps and (val_dataset is None or eval_done) and \
        _any_rank(rank == 0 and (out / "model.safetensors").exists(), device)
    if finished:
        if rank == 0:
            log.info("%s: the run finished at step %d; nothing to do (a larger --steps extends it)", out, state["step"])
        last = json.loads((out / "eval.jsonl").read_text().splitlines()[-1]) if rank == 0 and eval_done else None
        return {"step": state["step"], "interrupted": False, "paused": False, "already_done": True, "eval": last,
                "train_seconds": state["train_seconds"], "wall_seconds": 0.0, "num_skipped": state["num_skipped"],
                "num_audio_missing": state["num_audio_missing"], "num_nonfinite": state["num_nonfinite"],
                "checkpoint": str(ckpt_path), "model": model}

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        mods = model_cfg.modality_fusion
        # late fusion never uses the bottleneck parameter; DDP ignores frozen ones (requires_grad False)
        unused = model_cfg.use_bottleneck and (len(mods) < 2 or model_cfg.fusion_layer >= model_cfg.num_layers) \
            and model.bottleneck.requires_grad
        net = DDP(_PerModality(model), device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=unused)
    forward = net if world > 1 else model.forward_per_modality
    if tc.compile:
        # fullgraph where the backend is known to trace without a break (the triton launchers still do
        # host work; DDP splits its graphs on purpose)
        forward = torch.compile(forward, fullgraph=world == 1 and model.backend in COMPILE_CLEAN_BACKENDS)

    per_rank = tc.batch_size // world
    sampler = ResumableSampler(train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed)
    drop_last = sampler.num_samples >= per_rank
    num_workers = resolve_num_workers(tc.num_workers)
    # persistent workers: an epoch boundary does not restart the worker processes
    loader = make_loader(train_dataset, per_rank, sampler, num_workers, tc.prefetch_factor,
                         pin_memory=device.type == "cuda", drop_last=drop_last,
                         # a dedicated generator: creating an iterator must not draw from the global RNG
                         generator=torch.Generator().manual_seed(tc.seed))
    data_wait = DataWait(DATA_WAIT_WINDOW, num_workers)
    warmup, base_lr = tc.warmup(), tc.scaled_lr()

    def trainer_state():
        return {**state, "world_size": world, "model_config": model_cfg.to_dict(),
                "train_config": dataclasses.asdict(tc), "multi_label": multi_label,
                "train_examples": len(train_dataset)}

    def save():
        nonlocal last_ckpt
        rng_t, rng_m = ckpt.capture_rng({"mixup": mixup_gen})
        if world > 1:  # every rank's torch RNG (dropout, stochastic depth) goes into the checkpoint
            mine = rng_t["rng.torch"]
            allr = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(allr, mine)
            rng_t.update({f"rng.torch.rank{r}": s for r, s in enumerate(allr)})
        if rank == 0:
            ckpt.save_checkpoint(ckpt_path, model, optimizer, trainer_state(), rng_t, rng_m)
        last_ckpt = (ckpt_path, state["step"])

    def run_eval():
        if val_dataset is None:
            return None
        res = evaluate(model, val_dataset, multi_label, batch_size=max(per_rank, 1), device=device,
                       num_workers=num_workers, rank=rank, world=world)
        res["step"] = state["step"]
        if rank == 0:
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
            log.info("eval at step %d: %s", state["step"], res)
        return res

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=state["step"], disable=not (tc.progress and rank == 0),
               desc="train", dynamic_ncols=True)
    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None
    start_step, interrupted, paused, last_eval = state["step"], False, False, None
    t_start = time.perf_counter()
    try:
        with _StopFlag() as stop:
            while state["step"] < tc.steps and not interrupted and not paused:
                sampler.set_position(state["epoch"], state["batch_in_epoch"] * per_rank)
                # an epoch read from its start that gives no usable batch would repeat forever
                whole_epoch, usable, skipped_here, reasons = state["batch_in_epoch"] == 0, 0, 0, []
                t_data = time.perf_counter()  # data_s: from here to a usable batch (skipped ones included)
                for batch in loader:
                    flags = torch.tensor([float("label" not in batch), float(stop.set)], device=device)
                    if world > 1:  # every rank skips together and stops together
                        _all_reduce(flags, dist.ReduceOp.MAX)
                    if flags[1] > 0:  # a signal: this batch is not consumed, the resumed run reads it
                        save()
                        interrupted = True
                        break
                    state["batch_in_epoch"] += 1
                    state["num_skipped"] += batch["num_skipped"]
                    state["num_audio_missing"] += batch["num_audio_missing"]
                    if flags[0] > 0:
                        skipped_here += batch["num_skipped"]
                        reasons += batch.get("skipped", [])[:3 - len(reasons)]
                        log.warning("a whole batch was unreadable (%s); skipping it", batch.get("skipped"))
                        continue
                    usable += 1
                    t0 = time.perf_counter()
                    data_s = t0 - t_data
                    step = state["step"]
                    lr = compound_lr(step, base_lr, warmup, tc.steps)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    targets = batch["label"]
                    lam = 1.0
                    if tc.mixup_alpha > 0:
                        lam = sample_mixup_lambda(tc.mixup_alpha, mixup_gen)
                        batch = mixup(batch, lam, keys=(*model_cfg.modality_fusion, "label"))
                        targets = batch["label"]
                    inputs = model_inputs(batch, model_cfg.modality_fusion, device)
                    targets = targets.to(device)
                    with _autocast(device):
                        logits = forward(**inputs)
                    logits = {k: v.float() for k, v in logits.items()}
                    loss = classification_loss(logits, targets, multi_label, tc.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
                    # one host sync, as reading the loss for the log already costs; the gradient is
                    # all-reduced, so every rank sees the same norm, but the flag is shared to be sure
                    finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(gnorm))
                    if _any_rank(not finite, device):
                        # skip the update: the parameters and the optimizer state stay as they were
                        optimizer.zero_grad(set_to_none=True)
                        state["num_nonfinite"] += 1
                        state["nonfinite_streak"] += 1
                        loss_f, gnorm_f = float(loss.detach()), float(gnorm)
                        log.warning("step %d: loss %g, grad norm %g: not finite; the update was skipped "
                                    "(%d in a row, --max-nonfinite %d)", step + 1, loss_f, gnorm_f,
                                    state["nonfinite_streak"], tc.max_nonfinite)
                        if state["nonfinite_streak"] >= tc.max_nonfinite:
                            bad_inputs = [m for m, x in inputs.items() if not torch.isfinite(x).all()]
                            raise NonFiniteError(_nonfinite_message(tc, step + 1, loss_f, gnorm_f, bad_inputs,
                                                                    last_ckpt, base_lr))
                        continue
                    state["nonfinite_streak"] = 0
                    optimizer.step()
                    state["step"] += 1
                    dt = time.perf_counter() - t0
                    state["train_seconds"] += dt
                    if state["step"] > start_step + 1 and rank == 0:  # the first batch also waits for worker start-up
                        data_wait.add(data_s, dt)
                    loss_v = loss.detach()
                    if world > 1:
                        loss_v = _all_reduce(loss_v.clone()) / world
                    first = next(iter(logits.values())).detach().float().cpu().numpy()
                    y = targets.detach().cpu().numpy()
                    rec = {"step": state["step"], "loss": float(loss_v), "lr": lr, "grad_norm": float(gnorm),
                           "epoch": state["epoch"], "mixup_lambda": lam,
                           ("prec@1" if multi_label else "accuracy"):
                               precision_at_1(y, first) if multi_label else topk_accuracy(y, first, 1),
                           "examples_per_s": len(y) * world / max(dt, 1e-9),
                           "step_s": dt, "data_s": data_s,
                           "num_skipped": state["num_skipped"], "num_audio_missing": state["num_audio_missing"]}
                    if metrics_f is not None and (state["step"] % tc.log_every == 0 or state["step"] == tc.steps):
                        metrics_f.write(json.dumps(rec) + "\n")
                        metrics_f.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.3g}", data=f"{data_wait.fraction():.0%}")
                    if on_step is not None:
                        on_step(state["step"], rec)
                    done = state["step"] >= tc.steps
                    paused = tc.stop_after is not None and state["step"] - start_step >= tc.stop_after
                    if tc.eval_every and state["step"] % tc.eval_every == 0 and not done:
                        last_eval = run_eval()
                    if done or paused or (tc.ckpt_every and state["step"] % tc.ckpt_every == 0):
                        save()
                    if done or paused:
                        break
                    t_data = time.perf_counter()  # after eval and checkpoints: those are not data wait
                else:
                    # (a resume at an epoch's last batch legitimately finds nothing left of that epoch)
                    if whole_epoch and len(loader) == 0:
                        raise ValueError(f"the training set ({len(train_dataset)} examples) gives no batch of {per_rank}")
                    if whole_epoch and usable == 0:
                        raise ValueError(f"epoch {state['epoch']} gave no batch to train on: every batch was "
                                         f"unreadable ({skipped_here} examples skipped, of {len(train_dataset)} in the "
                                         f"training set); the first reasons: " + "; ".join(reasons))
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
        _stop_workers(loader)
    if state["step"] >= tc.steps:
        if not eval_done or state["step"] > start_step:
            last_eval = run_eval()
        if rank == 0:
            # the task, for `mbt-fast predict`: folder datasets name their classes, others give None
            model.save_pretrained(out / "model.safetensors", class_names=getattr(train_dataset, "class_names", None),
                                  multi_label=multi_label)
    if rank == 0 and tc.plot:
        plot_curves(out)
    if state["num_skipped"] and rank == 0:
        log.warning("%d unreadable examples were skipped during training", state["num_skipped"])
    return {"step": state["step"], "interrupted": interrupted, "paused": paused, "already_done": False,
            "eval": last_eval, "train_seconds": state["train_seconds"], "wall_seconds": time.perf_counter() - t_start,
            "num_skipped": state["num_skipped"], "num_audio_missing": state["num_audio_missing"],
            "num_nonfinite": state["num_nonfinite"], "checkpoint": str(ckpt_path), "model": model}
