"""``mbt-fast prepare SOURCE --out DIR``: decode every video of a CSV or a class folder once into a
prepared cache (uint8 frames at the training resolution + log-mels, sharded safetensors); train from it
with ``mbt-fast train --prepared DIR``. Interrupted? Run the same command again: finished shards are kept.

    mbt-fast prepare train.csv --root /videos --out /fast/prepared_train
    mbt-fast prepare vggsound/train/ --out /fast/prepared_vgg --crop 224
"""
from __future__ import annotations

import logging
import sys

from mbt_fast.commands.argtypes import positive_int


def run(args) -> int:
    from mbt_fast.data.prepared import PreparedError, prepare

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        index = prepare(args.source, args.out, root=args.root, crop=args.crop, num_mel=args.num_mel,
                        clips_per_shard=args.clips_per_shard, progress=not args.no_progress)
    except (PreparedError, OSError) as e:
        print(f"mbt-fast prepare: {e}", file=sys.stderr)
        return 2
    n, bad = index["num_items"], index["num_skipped"]
    print(f"prepared {n - bad} of {n} videos into {args.out} ({bad} unreadable, skipped and recorded); "
          f"train with --prepared {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="decode videos once into a prepared cache for `train --prepared`",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="CSV of path,labels, or a folder SOURCE/<class>/<clip>")
    p.add_argument("--out", required=True, help="folder for the shards and index.json")
    p.add_argument("--root", default=None, help="CSV: root of relative paths (default: the CSV's folder)")
    p.add_argument("--crop", type=positive_int, default=224,
                   help="training crop size; frames are stored with short side 256/224 x crop (256 for 224)")
    p.add_argument("--num-mel", type=positive_int, default=128, help="log-mel bins (the model's spectrogram width)")
    p.add_argument("--clips-per-shard", type=positive_int, default=16,
                   help="videos per shard (~87 MB per 10 s clip at 455x256)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run)
