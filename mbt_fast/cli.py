"""``mbt-fast``: one sub-command per module in ``mbt_fast.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("info", "convert", "predict", "embed", "explain", "build", "bench", "prepare", "train", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbt-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mbt_fast.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"mbt_fast.commands.{name}":
                raise
            continue  # command not part of this build
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
