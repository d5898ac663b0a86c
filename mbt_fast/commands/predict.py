"""``mbt-fast predict``: video files -> the top-k classes with names and scores.

Examples::

    mbt-fast predict as.safetensors clip.mp4 --top-k 5
    mbt-fast predict checkpoint_123 --config config.json videos/ --num-clips 4 --json > predictions.jsonl
    mbt-fast predict ft.safetensors list.csv --labels names.txt --backend triton
"""
from __future__ import annotations

import json
import sys

from mbt_fast.commands.argtypes import finite_float, nonneg_int, positive_float, positive_int


def add_model_arguments(p) -> None:
    """The arguments every model-reading command shares (predict, embed)."""
    p.add_argument("model", help="a .safetensors file (mbt-fast convert / train) or a Scenic checkpoint with --config")
    p.add_argument("files", nargs="+", help="video files, folders of them (recursively), or CSVs whose first column is a path")
    p.add_argument("--config", help="JSON config of a Scenic checkpoint (Scenic's model fields and input_shapes)")
    p.add_argument("--num-clips", type=positive_int, default=1,
                   help="linspaced clips per file, raw logits averaged (Scenic's test protocol: 4); 1: the centre clip")
    p.add_argument("--batch-size", type=positive_int, default=8, help="files per model call")
    p.add_argument("--num-workers", type=nonneg_int, default=0, help="processes decoding files (0: this one)")
    p.add_argument("--backend", default="auto", help="reference | eager_sdpa | torch | triton | cuda | cuda-emu | auto")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    p.add_argument("--spec-mean", type=finite_float, default=1.102, help="log-mel normalisation mean (as in training)")
    p.add_argument("--spec-std", type=positive_float, default=2.762, help="log-mel normalisation std (as in training)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def files_kw(args) -> dict:
    """``inference.run_files`` arguments from the shared flags."""
    return dict(num_clips=args.num_clips, batch_size=args.batch_size, num_workers=args.num_workers,
                progress=not args.no_progress, spec_mean=args.spec_mean, spec_std=args.spec_std)


def open_model(args, prog: str):
    """(model on its device, or None after printing the error)."""
    import torch

    from mbt_fast.inference import load_model

    try:
        model = load_model(args.model, config=args.config, backend=args.backend)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        return model.to(device)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


def run(args) -> int:
    from mbt_fast import inference

    model = open_model(args, "mbt-fast predict")
    if model is None:
        return 2
    try:
        names = inference.class_names(model, args.labels)
        multi = inference.multi_label(model, True if args.multi_label else False if args.single_label else None)
        paths = inference.expand_sources(args.files)
    except (ValueError, OSError) as e:
        print(f"mbt-fast predict: {e}", file=sys.stderr)
        return 2
    kind = "sigmoid (multi-label)" if multi else "softmax (single-label)"
    if not args.json:
        print(f"{len(paths)} file(s); scores: {kind}; {args.num_clips} clip(s) per file, logits averaged")
    bad = 0
    for path, clip, out, error in inference.run_files(model, paths, inference.logits_fn, **files_kw(args)):
        if error is not None:
            bad += 1
            print(f"mbt-fast predict: skipped {error}", file=sys.stderr)
            if args.json:
                print(json.dumps({"file": path, "error": error}), flush=True)
            continue
        if clip.audio_missing:
            print(f"mbt-fast predict: warning: {path} has no audio track; answered from {', '.join(clip.present)} "
                  f"only (missing='drop')", file=sys.stderr)
        top = inference.top_k(inference.scores(out["logits"], multi), names, args.top_k)
        if args.json:
            print(json.dumps({"file": path, "modalities": list(clip.present), "score": kind.split()[0],
                              "num_clips": args.num_clips, "top": top}), flush=True)
        else:
            used = "" if len(clip.present) == len(model.cfg.modality_fusion) else f"  [from {', '.join(clip.present)} only]"
            print(f"{path}{used}")
            for t in top:
                index = "" if t["name"] == f"class {t['index']}" else f"  (class {t['index']})"
                print(f"  {t['score']:.4f}  {t['name']}{index}")
    if bad:  # every other file was answered; the status says not all were
        print(f"mbt-fast predict: {bad} of {len(paths)} file(s) could not be read (above)", file=sys.stderr)
    return 1 if bad else 0


def register(sub) -> None:
    p = sub.add_parser("predict", help="video files -> top-k classes with names and scores",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--top-k", type=positive_int, default=5, help="classes per file")
    p.add_argument("--json", action="store_true", help="one JSON line per file on stdout")
    p.add_argument("--labels", help="class names: one per line, or index,name CSV (default: the model file's, "
                                    "AudioSet's for 527 classes, else 'class i')")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--multi-label", action="store_true", help="sigmoid scores (default for 527 classes or from metadata)")
    kind.add_argument("--single-label", action="store_true", help="softmax scores")
    p.set_defaults(func=run)
