"""``mbt-fast train``: train MBT on the synthetic task or on video files (Scenic's recipe by default).

Examples::

    mbt-fast train --preset tiny --data synthetic --steps 200 --ckpt-every 50 --out runs/tiny
    mbt-fast train --preset tiny --data synthetic --steps 200 --out runs/tiny --resume
    mbt-fast train --preset tiny --data synthetic --steps 200 --out runs/tiny --overwrite   # old run -> runs/tiny.old-*
    mbt-fast train --preset mbt_base_16x2 --csv train.csv --val-csv eval.csv --num-classes 527 --out runs/as
    torchrun --nproc_per_node 8 -m mbt_fast.cli train --preset mbt_base_16x2 --data-dir vggsound/ ...
    mbt-fast train --init-from as.safetensors --data-dir myvideos/ --steps 2000 --out runs/ft   # fine-tune
    mbt-fast train --init-from checkpoint_1234 --init-config config.json --data-dir myvideos/ --out runs/ft
    mbt-fast train --init-from as.safetensors --freeze-backbone --data-dir myvideos/ --out runs/probe
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from mbt_fast.commands.argtypes import finite_float, fraction, nonneg_float, nonneg_int, positive_float, positive_int


def workers(text: str):
    """``auto`` or an integer >= 0 (``--num-workers``)."""
    if text == "auto":
        return text
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}") from None


workers.__name__ = "'auto' or int>=0"


def synthetic_shapes(cfg) -> dict:
    """The synthetic task's shapes of the modalities beyond rgb and spectrogram: flow ``(T, H, W)``,
    feature sequences ``(n, d_in)``; the task has no generator for another kind of input."""
    from mbt_fast.modalities import FeatureEmbedding, FlowEmbedding, get_embedding

    out = {}
    for m in cfg.modality_fusion:
        if m in ("rgb", "spectrogram"):
            continue
        emb = get_embedding(m)
        if not issubclass(emb, (FlowEmbedding, FeatureEmbedding)):
            raise ValueError(f"--data synthetic: modality {m!r} ({emb.__name__}) has no synthetic generator; the "
                             f"synthetic task makes rgb, spectrogram, flow and feature sequences (FeatureEmbedding)")
        out[m] = cfg.input_shapes[m][1:4] if issubclass(emb, FlowEmbedding) else cfg.input_shapes[m][1:3]
    return out


def build_datasets(args, cfg):
    """(model config with num_classes set, train dataset, validation dataset or None)."""
    from mbt_fast.data import SyntheticAVDataset, VideoDataset
    from mbt_fast.data.dataset import video_shapes

    mods = cfg.modality_fusion
    shapes = video_shapes(cfg)
    rgb_shape, spec_shape = shapes["rgb_shape"], shapes["spectrogram_shape"]
    kind = _kind(args)
    if kind == "synthetic":
        extra = synthetic_shapes(cfg)
        train_ds = SyntheticAVDataset(args.train_size, rgb_shape, spec_shape, seed=args.seed, split="train",
                                      modalities=mods, extra_shapes=extra)
        val_ds = SyntheticAVDataset(args.val_size, rgb_shape, spec_shape, seed=args.seed, split="val",
                                    modalities=mods, extra_shapes=extra) if args.val_size > 0 else None
        return dataclasses.replace(cfg, num_classes=train_ds.num_classes), train_ds, val_ds
    common = dict(**shapes, modalities=mods, spec_mean=args.spec_mean, spec_std=args.spec_std,
                  spec_augment=not args.no_spec_augment, flow_scale=args.flow_scale, flow_root=args.flow_root,
                  features_root=args.features_root)
    eval_mode = "test" if args.num_test_clips > 1 else "eval"
    eval_kw = dict(common, num_clips=args.num_test_clips)
    if kind == "prepared":
        from mbt_fast.data.prepared import PreparedDataset, read_index

        src = read_index(args.prepared)["source"]
        multi = src["kind"] != "folder" and not args.single_label
        n_cls = None if src["kind"] == "folder" else args.num_classes
        train_ds = PreparedDataset(args.prepared, num_classes=n_cls, multi_label=multi, mode="train", **common)
        if args.val_dir:
            val_ds = VideoDataset.from_folder(args.val_dir, mode=eval_mode, **eval_kw)
        elif args.val_csv:
            val_ds = VideoDataset.from_csv(args.val_csv, mode=eval_mode, num_classes=train_ds.num_classes,
                                           multi_label=multi, root=args.data_dir, **eval_kw)
        else:
            val_ds = None
        return dataclasses.replace(cfg, num_classes=train_ds.num_classes), train_ds, val_ds
    if kind == "folder":
        if not args.data_dir:
            raise ValueError("--data folder needs --data-dir DIR (DIR/<class>/<clip>.mp4)")
        train_ds = VideoDataset.from_folder(args.data_dir, mode="train", **common)
        val_ds = VideoDataset.from_folder(args.val_dir, mode=eval_mode, **eval_kw) if args.val_dir else None
        if val_ds is not None and val_ds.class_names != train_ds.class_names:
            raise ValueError(f"--val-dir classes {val_ds.class_names} differ from --data-dir classes {train_ds.class_names}")
        return dataclasses.replace(cfg, num_classes=train_ds.num_classes), train_ds, val_ds
    if kind == "csv":
        if not args.csv:
            raise ValueError("--data csv needs --csv FILE (rows: path,labels)")
        multi = not args.single_label
        kw = dict(num_classes=args.num_classes, multi_label=multi, root=args.data_dir)
        train_ds = VideoDataset.from_csv(args.csv, mode="train", **kw, **common)
        val_ds = VideoDataset.from_csv(args.val_csv, mode=eval_mode, **kw, **eval_kw) if args.val_csv else None
        return dataclasses.replace(cfg, num_classes=args.num_classes), train_ds, val_ds
    raise ValueError(f"--data must be synthetic, folder, csv or prepared, got {kind!r}")


def _kind(args) -> str:
    if args.data:
        if args.data == "prepared" and not args.prepared:
            raise ValueError("--data prepared needs --prepared DIR (made by `mbt-fast prepare`)")
        return args.data
    return "prepared" if args.prepared else "csv" if args.csv else "folder" if args.data_dir else "synthetic"


def run_args(args) -> dict:
    """The arguments besides TrainConfig's that define the run (model preset or --init-from, data); a resume
    must match them. Paths are stored absolute, so a resume from another working directory compares equal."""
    def path(p):
        return str(Path(p).resolve()) if p else None

    kind = _kind(args)
    d = {"preset": _preset(args), "init_from": path(args.init_from), "init_config": path(args.init_config),
         "data": kind}
    if kind == "synthetic":
        return {**d, "train_size": args.train_size, "val_size": args.val_size}
    d.update(data_dir=path(args.data_dir), num_test_clips=args.num_test_clips, spec_mean=args.spec_mean,
             spec_std=args.spec_std, no_spec_augment=args.no_spec_augment)
    # the sidecar options only when given, so that runs from before they existed resume as they were
    sidecar = {"flow_root": path(args.flow_root), "features_root": path(args.features_root),
               "flow_scale": args.flow_scale if args.flow_scale != 20.0 else None}
    d.update({k: v for k, v in sidecar.items() if v is not None})
    if kind == "folder":
        return {**d, "val_dir": path(args.val_dir)}
    if kind == "prepared":
        return {**d, "prepared": path(args.prepared), "val_dir": path(args.val_dir), "val_csv": path(args.val_csv),
                "num_classes": args.num_classes, "single_label": args.single_label}
    return {**d, "csv": path(args.csv), "val_csv": path(args.val_csv), "num_classes": args.num_classes,
            "single_label": args.single_label}


def _preset(args) -> str | None:
    """The preset the model is built from; None with --init-from (the architecture is MODEL's)."""
    return None if args.init_from else (args.preset or "tiny")


def _checkpoint_model_config(path):
    """The model config in the run checkpoint ``path``, from its metadata alone; None when it cannot be read
    (the trainer then reads the checkpoint itself and reports the problem in its own words)."""
    import mbt_fast
    from mbt_fast.train.checkpoint import read_checkpoint

    try:
        _, meta = read_checkpoint(path, with_tensors=False)
        return mbt_fast.MBTConfig.from_scenic(meta["trainer"]["model_config"])
    except Exception:  # noqa: BLE001  (any failure here is reported by the trainer, in its own words)
        return None


def base_config(args):
    """(model config before the data sets num_classes, model to initialise from or None).

    With --init-from the architecture is MODEL's; a resume takes it from the run's own checkpoint and does
    not read MODEL again (the run's weights are in its checkpoint)."""
    import mbt_fast
    from mbt_fast.train.run_dir import CHECKPOINT_NAME

    if not args.init_from:
        return mbt_fast.MBTConfig.preset(_preset(args)), None
    if args.resume:
        cfg = _checkpoint_model_config(Path(args.out) / CHECKPOINT_NAME)
        if cfg is not None:
            return cfg, None
    from mbt_fast.inference import is_safetensors, load_model

    path = Path(args.init_from)
    try:
        if args.init_config is None and path.is_file() and not is_safetensors(path):
            # load_model's message names --config, predict's flag; here it is --init-config
            raise ValueError(f"--init-from {path}: not a safetensors file; a Scenic checkpoint needs its config: "
                             f"--init-config CONFIG.json (Scenic's model fields and input_shapes, as for "
                             f"`mbt-fast convert --config`)")
        source = load_model(path, config=args.init_config)
    except OSError as e:  # a missing or unreadable file: a bad argument, like a malformed one
        raise ValueError(f"--init-from: {e}") from None
    return source.cfg, source


def _finetune_flag_error(args) -> str | None:
    if args.init_from and args.preset is not None:
        return (f"--preset and --init-from exclude each other: with --init-from {args.init_from} the architecture "
                f"is that model's config (num_classes from the data); drop --preset {args.preset}")
    if args.init_config and not args.init_from:
        return f"--init-config {args.init_config} is the config of a Scenic --init-from checkpoint; pass --init-from too"
    if args.freeze_backbone and not args.init_from:
        return ("--freeze-backbone trains the classifier alone; without --init-from MODEL the backbone would stay "
                "at its random initialisation")
    return None


def run(args) -> int:
    import torch

    from mbt_fast.train.trainer import TrainConfig, dist_info, train

    rank, _, _ = dist_info()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup_steps is not None and args.warmup_steps > args.steps:
        print(f"mbt-fast train: --warmup-steps {args.warmup_steps} exceeds --steps {args.steps}", file=sys.stderr)
        return 2
    flag_error = _finetune_flag_error(args)
    if flag_error:
        print(f"mbt-fast train: {flag_error}", file=sys.stderr)
        return 2
    try:
        cfg, source = base_config(args)
        overrides = {"stochastic_droplayer_rate": args.droplayer}
        if args.fusion_layer is not None:
            overrides["fusion_layer"] = args.fusion_layer
        cfg = dataclasses.replace(cfg, **overrides)
        cfg, train_ds, val_ds = build_datasets(args, cfg)
        tc = TrainConfig(out_dir=args.out, steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
                         lr=args.lr if args.lr is not None else (0.5 if args.optimizer == "sgd" else 1e-3),
                         weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
                         label_smoothing=args.label_smoothing, mixup_alpha=args.mixup_alpha, seed=args.seed,
                         backend=args.backend, compile=args.compile, device=args.device, num_workers=args.num_workers,
                         prefetch_factor=args.prefetch_factor,
                         ckpt_every=args.ckpt_every, eval_every=args.eval_every, log_every=args.log_every,
                         progress=not args.no_progress, stop_after=args.stop_after,
                         max_nonfinite=args.max_nonfinite, freeze_backbone=args.freeze_backbone,
                         run_args=run_args(args))
        res = train(tc, cfg, train_ds, val_ds, resume=args.resume, overwrite=args.overwrite, init_from=source,
                    init_name=args.init_from)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"mbt-fast train: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        if res["already_done"]:
            print(f"already finished at step {res['step']}; nothing to do (checkpoint {res['checkpoint']}; "
                  f"a larger --steps extends the run)")
        elif res["interrupted"]:
            print(f"interrupted at step {res['step']}; checkpoint {res['checkpoint']} (continue with --resume)")
        elif res["paused"]:
            print(f"stopped at step {res['step']} (--stop-after); checkpoint {res['checkpoint']}")
        else:
            print(f"done: {res['step']} steps, checkpoint {res['checkpoint']}, model {args.out}/model.safetensors")
        if res["eval"]:
            print("eval:", {k: v for k, v in res["eval"].items()})
        if res["num_skipped"]:
            print(f"{res['num_skipped']} unreadable examples were skipped")
    return 130 if res["interrupted"] else 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train MBT (synthetic data or video files; Scenic's recipe by default)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None,
                   help="model preset (default tiny; tiny, tiny_trimodal, mbt_base_16x2, mbt_base_16x2_spec, mbt_base_16x2_rgb); "
                        "not with --init-from")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, eval.jsonl, checkpoint, curves.png")
    p.add_argument("--steps", type=positive_int, default=1000, help="total optimizer steps (the schedule spans them)")
    own = p.add_mutually_exclusive_group()
    own.add_argument("--resume", action="store_true",
                     help="continue the run in OUT from its checkpoint (an error if there is none, or if an "
                          "argument that changes the run differs)")
    own.add_argument("--overwrite", action="store_true",
                     help="OUT holds an old run: move it aside to OUT.old-<timestamp> (nothing is deleted)")
    p.add_argument("--backend", default="torch", help="reference | eager_sdpa | torch | triton | cuda | cuda-emu | auto")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (fullgraph; backends torch, cuda and cuda-emu compile with "
                        "no graph break); the first step pays the compile time")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--init-from", metavar="MODEL",
                   help="start from MODEL's weights and architecture: a .safetensors from save_pretrained, "
                        "`mbt-fast convert` or `mbt-fast train`, or a Scenic msgpack checkpoint (with "
                        "--init-config); tensors whose name and shape match are loaded, the rest (the classifier, "
                        "when the class count differs) keeps its fresh initialisation")
    f.add_argument("--init-config", metavar="CONFIG.json",
                   help="the model config of a Scenic --init-from checkpoint (as `mbt-fast convert --config`)")
    f.add_argument("--freeze-backbone", action="store_true",
                   help="train the classifier alone (head, and pre_logits if any): linear probing; needs --init-from")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=("synthetic", "folder", "csv", "prepared"), default=None,
                   help="default: prepared with --prepared, csv with --csv, folder with --data-dir, else synthetic")
    d.add_argument("--prepared", help="training set from `mbt-fast prepare` (its CSV: also --num-classes, "
                                      "--single-label); validation still from --val-dir / --val-csv videos")
    d.add_argument("--data-dir", help="folder DIR/<class>/<clip> (single label); with --csv: root of relative paths")
    d.add_argument("--csv", help="CSV of path,labels (labels: class indices separated by ';')")
    d.add_argument("--val-dir", help="validation folder (same classes as --data-dir)")
    d.add_argument("--val-csv", help="validation CSV")
    d.add_argument("--num-classes", type=positive_int, default=527, help="classes of a CSV dataset (AudioSet: 527)")
    d.add_argument("--single-label", action="store_true", help="CSV labels are single (softmax, top-1/top-5)")
    d.add_argument("--num-test-clips", type=positive_int, default=1, help="clips per validation video (Scenic test: 4)")
    d.add_argument("--flow-root", metavar="DIR", help="folder of the flow sidecar files <video stem>.flow.npy "
                                                      "(default: beside each video; README, Any set of modalities)")
    d.add_argument("--flow-scale", type=positive_float, default=20.0,
                   help="flow: displacement in pixels mapped to 1 (then clamped to [-1, 1])")
    d.add_argument("--features-root", metavar="DIR", help="folder of feature-sequence sidecar files "
                                                          "<video stem>.<modality>.npy (default: beside each video)")
    d.add_argument("--train-size", type=positive_int, default=8192, help="synthetic: examples per epoch")
    d.add_argument("--val-size", type=nonneg_int, default=512, help="synthetic: validation examples (0: none)")
    d.add_argument("--spec-mean", type=finite_float, default=1.102, help="log-mel normalisation mean (Scenic's)")
    d.add_argument("--spec-std", type=positive_float, default=2.762, help="log-mel normalisation std (Scenic's)")
    d.add_argument("--no-spec-augment", action="store_true", help="disable SpecAugment frequency masking")
    d.add_argument("--num-workers", type=workers, default="auto",
                   help="DataLoader worker processes, one core each (default auto: the cores this process may use, "
                        "shared by the ranks of a node, at most 8; 0: load in the training process)")
    d.add_argument("--prefetch-factor", type=positive_int, default=2,
                   help="batches each worker loads ahead (memory: workers x factor x batch)")
    o = p.add_argument_group("optimisation (defaults: Scenic's balanced AudioSet recipe)")
    o.add_argument("--batch-size", type=positive_int, default=64, help="global batch size")
    o.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    o.add_argument("--lr", type=positive_float, default=None, help="sgd: base lr at batch 64, scaled linearly (default 0.5); adamw: 1e-3")
    o.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    o.add_argument("--warmup-steps", type=nonneg_int, default=None, help="default 5%% of --steps")
    o.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="global grad-norm clip (0: off)")
    o.add_argument("--label-smoothing", type=fraction, default=0.3)
    o.add_argument("--mixup-alpha", type=nonneg_float, default=0.5, help="0: off")
    o.add_argument("--droplayer", type=fraction, default=0.3, help="stochastic depth rate at the last layer")
    o.add_argument("--fusion-layer", type=nonneg_int, default=None, help="override the preset's fusion layer")
    o.add_argument("--seed", type=nonneg_int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--ckpt-every", type=nonneg_int, default=500, help="checkpoint every K steps (and at the end / on SIGINT, SIGTERM)")
    r.add_argument("--eval-every", type=nonneg_int, default=0, help="evaluate every K steps (0: at the end)")
    r.add_argument("--stop-after", type=positive_int, default=None, help="stop after this many steps of this run (checkpointed)")
    r.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    r.add_argument("--log-every", type=positive_int, default=1, help="write every K-th step to metrics.jsonl")
    r.add_argument("--max-nonfinite", type=positive_int, default=3,
                   help="stop (exit non-zero) after this many consecutive steps with a non-finite loss or "
                        "gradient; those steps do not update the parameters")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run)
