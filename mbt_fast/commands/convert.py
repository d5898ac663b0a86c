"""``mbt-fast convert``: a Scenic msgpack checkpoint to a safetensors file ``MBT.from_pretrained`` loads."""
from __future__ import annotations

import os
import sys


def run(args) -> int:
    from mbt_fast.config import MBTConfig
    from mbt_fast.convert import CheckpointError, load_scenic_checkpoint

    out = os.path.realpath(args.out)
    if out in (os.path.realpath(args.checkpoint), os.path.realpath(args.config)):
        print(f"mbt-fast convert: --out {args.out} is one of the inputs; it would overwrite it", file=sys.stderr)
        return 2
    if os.path.isdir(args.out):
        print(f"mbt-fast convert: --out {args.out} is a directory; expected a .safetensors file path", file=sys.stderr)
        return 2
    try:
        cfg = MBTConfig.from_json(args.config)
        model = load_scenic_checkpoint(args.checkpoint, cfg)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        print(f"mbt-fast convert: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n:,} parameters, config {args.config}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Scenic/Flax MBT checkpoint to safetensors")
    p.add_argument("checkpoint", help="Scenic checkpoint file (msgpack, e.g. checkpoint_<step>)")
    p.add_argument("--config", required=True, help="JSON with Scenic's model fields (and input_shapes)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.set_defaults(func=run)
