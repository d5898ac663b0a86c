"""Range-checked argparse types: a bad value is a parser error naming the flag, the expected range and
the value given (``argument --lr: expected a finite number > 0, got 'nan'``)."""
from __future__ import annotations

import argparse
import math


def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return value

    parse.__name__ = f"int>={lo}"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite float, optionally bounded: ``[lo, hi]`` with either end open."""
    if lo is not None and hi is not None:
        expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        expected = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        expected = "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
finite_float = float_in()
positive_float = float_in(0, lo_open=True)
nonneg_float = float_in(0)
fraction = float_in(0, 1, hi_open=True)  # label smoothing, drop rates: 1 would remove everything
