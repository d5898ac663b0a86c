"""``mbt-fast demo``: does fusion help? The tiny MBT on the synthetic audio-visual task, four ways (or, with
``--preset tiny_trimodal``, with optical flow as a third modality, six ways), on the CPU."""
from __future__ import annotations

import logging

from mbt_fast.commands import argtypes
from mbt_fast.train.demo import DEMO_PRESETS


def run(args) -> int:
    from mbt_fast.train.demo import demo_variants, format_table, run_demo

    logging.basicConfig(level=logging.WARNING)
    names = args.variants.split(",") if args.variants else demo_variants(args.preset)
    summary = run_demo(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       val_size=args.val_size, threads=args.threads, variants=names, backend=args.backend,
                       progress=not args.no_progress, preset=args.preset)
    print(format_table(summary, args.preset))
    print(f"wrote {args.out}/summary.json and {args.out}/demo.png")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny preset 4 ways on synthetic AV data (CPU, a few minutes)",
                       description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (summary.json, demo.png, one run per variant)")
    p.add_argument("--steps", type=argtypes.positive_int, default=300, help="training steps per variant")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=32)
    p.add_argument("--lr", type=argtypes.positive_float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=argtypes.nonneg_int, default=0)
    p.add_argument("--val-size", type=argtypes.positive_int, default=512, help="held-out examples")
    p.add_argument("--threads", type=argtypes.positive_int, default=1, help="torch CPU threads (1 is robust on a busy small CPU)")
    p.add_argument("--preset", choices=DEMO_PRESETS, default="tiny",
                   help="tiny: rgb + spectrogram; tiny_trimodal: + optical flow carrying the task's motion bit")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the preset's variants (tiny: unimodal_rgb,unimodal_spectrogram,"
                        "late_fusion,bottleneck_fusion; tiny_trimodal adds unimodal_flow,bottleneck_fusion_av)")
    p.add_argument("--backend", default="torch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
