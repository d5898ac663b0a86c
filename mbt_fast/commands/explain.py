"""``mbt-fast explain``: where the model looks -- CLS and bottleneck attention maps of one video file.

Examples::

    mbt-fast explain model.safetensors clip.mp4 --out explain/clip
    mbt-fast explain checkpoint_100000 clip.mp4 --config mbt_b.json --layer 8 --out explain/clip

Writes ``rgb_attention.png``, ``spectrogram_attention.png``, ``top_classes.png`` and ``attention.npz``
(the numbers behind the images) to ``--out``; see :mod:`mbt_fast.explain`. It always runs the
reference encoder: the fused backends never materialise the attention matrix.
"""
from __future__ import annotations

import argparse
import sys

from mbt_fast.commands.argtypes import positive_int


def layer_index(text: str) -> int:
    """An integer (negative counts from the last layer); the range is checked against the model."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer layer index, got {text!r}") from None


def run(args) -> int:
    from pathlib import Path

    import torch

    from mbt_fast import explain as ex
    from mbt_fast import inference

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"mbt-fast explain: --out {out} is a file; expected a directory", file=sys.stderr)
        return 2
    try:
        model = inference.load_model(args.model, args.config)
        layer = ex.check_layer(model.cfg, args.layer)  # before decoding: a bad layer fails fast
        names = inference.class_names(model, args.labels)
        multi = inference.multi_label(model)
        clip = inference.decode_clip(args.file, model.cfg, num_clips=args.num_clips)
        n_clips = next(iter(clip.inputs.values())).shape[0]
        explanations = [ex.explain(model, {m: x[k:k + 1] for m, x in clip.inputs.items()}, layer)
                        for k in range(n_clips)]
    except (ValueError, TypeError, OSError) as e:
        print(f"mbt-fast explain: {e}", file=sys.stderr)
        return 2
    # the file's answer: its clips' logits averaged, then scored (Scenic's test protocol)
    logits = torch.from_numpy(sum(e.logits for e in explanations) / len(explanations))
    scores = inference.scores(logits, multi)
    kind = "sigmoid, multi-label" if multi else "softmax"
    paths = ex.save(out, explanations, clip.inputs, names, scores.numpy(), args.top_k, kind)

    used = " + ".join(clip.present)
    audio = " (no audio track: the spectrogram is left out)" if clip.audio_missing else ""
    print(f"{args.file}: layer {layer}, mean over {model.cfg.num_heads} heads, from {used}{audio}")
    for note in explanations[0].notes:
        print(f"  note: {note}")
    for row in inference.top_k(scores, names, args.top_k):
        print(f"  {row['score']:.3f}  {row['name']}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("explain", help="attention maps (CLS and bottleneck tokens) of one video's prediction")
    p.add_argument("model", help="model file: .safetensors, or a Scenic checkpoint with --config")
    p.add_argument("file", help="video file")
    p.add_argument("--out", required=True, help="output directory (created) for the PNGs and attention.npz")
    p.add_argument("--config", help="JSON with Scenic's model fields (for a Scenic checkpoint, or to override)")
    p.add_argument("--layer", type=layer_index, default=None,
                   help="encoder layer, 0-based (negative: from the end); default: the last")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes in the bar chart (default 5)")
    p.add_argument("--labels", help="class names: one per line, or index,name rows")
    p.add_argument("--num-clips", type=positive_int, default=1,
                   help="linspaced clips, one set of maps each; the scores use their mean logits (default 1)")
    p.set_defaults(func=run)
