"""Argument checks shared by the fused ops.

Everything here reads shapes, dtypes, devices and Python constants only, except ``check_row_weight``'s
range check, which reads a table's values once per table version (and never under ``torch.compile``).
Segment tables are Python tuples, validated once per (table, sizes) and cached, so the hot path does
no host work that depends on tensor data and ``torch.compile(fullgraph=True)`` traces straight through.
"""
from __future__ import annotations

import math
import numbers
import weakref
from functools import lru_cache

import torch

FAST_BACKENDS = ("torch", "triton", "cuda", "cuda-emu")


def check_backend(backend: str) -> None:
    if backend not in FAST_BACKENDS:
        raise ValueError(f"backend: expected one of {FAST_BACKENDS} for a packed op, got {backend!r}")


def check_tensor(name: str, t, ndim: int, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")


def check_key_mask(key_mask, batch: int, nk: int, like: torch.Tensor):
    """``key_mask``: None, or a bool ``[B, Nk]`` tensor on q's device (True: the key may be attended)."""
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask: expected a bool torch.Tensor [B, Nk] or None, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask: expected dtype torch.bool (True: the key may be attended), got {key_mask.dtype}")
    if tuple(key_mask.shape) != (batch, nk):
        raise ValueError(f"key_mask: expected shape [B, Nk] = {[batch, nk]}, got {list(key_mask.shape)}")
    if key_mask.device != like.device:
        raise ValueError(f"key_mask: expected device {like.device} (q's), got {key_mask.device}")
    return key_mask.contiguous()


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    return float(eps)


def check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: expected a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def as_int_rows(name: str, table, width: int, columns: str) -> tuple[tuple[int, ...], ...]:
    """``table`` (nested sequences or an integer tensor, eager only) as a tuple of int tuples."""
    if isinstance(table, torch.Tensor):  # convenience for eager callers; the model passes tuples
        if table.is_floating_point() or table.is_complex():
            raise TypeError(f"{name}: expected integer rows {columns}, got a {table.dtype} tensor")
        table = table.reshape(-1, width).tolist() if table.numel() else []
    rows = []
    for i, row in enumerate(table):
        row = tuple(row)
        if len(row) != width:
            raise ValueError(f"{name}: expected rows of {width} values {columns}, got row {i} = {row}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in row):
            raise TypeError(f"{name}: expected int values {columns}, got row {i} = {row}")
        row = tuple(int(v) for v in row)
        rows.append(row)
    if not rows:
        raise ValueError(f"{name}: expected at least one row {columns}, got none")
    return tuple(rows)


def _checked_attention_segments(seg: tuple, nq: int, nk: int) -> tuple:
    for row in seg:
        qs, qe, ks, ke = row
        if not (0 <= qs < qe <= nq and 0 <= ks < ke <= nk):
            raise ValueError(f"segments: row {row} is empty or outside q rows [0, {nq}) / k rows [0, {nk})")
    order = sorted(seg)
    for a, b in zip(order[:-1], order[1:]):
        if b[0] < a[1]:
            raise ValueError(f"segments: query ranges must not overlap, got {a} and {b}")
    return seg


_cached_attention_segments = lru_cache(maxsize=1024)(_checked_attention_segments)


def attention_segments(segments, nq: int, nk: int) -> tuple:
    """Validated ``(q_start, q_end, k_start, k_end)`` rows; checked once per table and sizes."""
    seg = as_int_rows("segments", segments, 4, "(q_start, q_end, k_start, k_end)")
    if torch.compiler.is_compiling():  # runs once, at trace time; dynamo does not trace caches
        return _checked_attention_segments(seg, nq, nk)
    return _cached_attention_segments(seg, nq, nk)


def _checked_row_segments(seg: tuple, n: int, n_weights: int) -> tuple:
    covered = 0
    for row in sorted(seg):
        s, e, m = row
        if not (0 <= s < e <= n):
            raise ValueError(f"segments: row {row} is empty or outside rows [0, {n})")
        if not 0 <= m < n_weights:
            raise ValueError(f"segments: row {row} names weight {m}, expected an index in [0, {n_weights})")
        if s != covered:
            what = "overlaps the previous row" if s < covered else f"leaves rows [{covered}, {s}) uncovered"
            raise ValueError(f"segments: every row of x must be covered exactly once; {row} {what}")
        covered = e
    if covered != n:
        raise ValueError(f"segments: every row of x must be covered exactly once; rows [{covered}, {n}) are uncovered")
    return seg


_cached_row_segments = lru_cache(maxsize=1024)(_checked_row_segments)


def row_segments(segments, n: int, n_weights: int) -> tuple:
    """Validated ``(start, end, weight_index)`` rows covering ``[0, n)`` exactly once."""
    seg = as_int_rows("segments", segments, 3, "(start, end, weight_index)")
    if torch.compiler.is_compiling():
        return _checked_row_segments(seg, n, n_weights)
    return _cached_row_segments(seg, n, n_weights)


# id(table) -> (weakref, version, n_weights) of row_weight tables whose values were range-checked
_CHECKED_ROW_WEIGHTS: dict[int, tuple] = {}


def check_row_weight(row_weight, x: torch.Tensor, table: torch.Tensor) -> None:
    """``row_weight``: int32 ``[N]`` with values in ``[0, M)`` for the ``[M, C]`` weight ``table``."""
    if not isinstance(row_weight, torch.Tensor) or row_weight.dtype != torch.int32 or row_weight.shape != (x.shape[0],):
        raise ValueError(f"row_weight: expected an int32 tensor of shape ({x.shape[0]},), got "
                         f"{getattr(row_weight, 'dtype', type(row_weight).__name__)} {tuple(getattr(row_weight, 'shape', ()))}")
    if table.shape[-1] != x.shape[-1]:
        raise ValueError(f"weights: expected last dimension {x.shape[-1]}, got shape {tuple(table.shape)}")
    M = table.shape[0]
    if torch.compiler.is_compiling() or row_weight.numel() == 0 or row_weight.device.type == "meta":
        return  # values are unknown while tracing; the model's tables are valid by construction
    entry = _CHECKED_ROW_WEIGHTS.get(id(row_weight))
    if entry is not None and entry[0]() is row_weight and entry[1] == row_weight._version and entry[2] == M:
        return
    lo, hi = (int(v) for v in torch.aminmax(row_weight))  # one read per table version, not per call
    if lo < 0 or hi >= M:
        raise ValueError(f"row_weight: expected values in [0, {M}) (rows of the weight table), got values in [{lo}, {hi}]")
    if len(_CHECKED_ROW_WEIGHTS) > 4096:
        _CHECKED_ROW_WEIGHTS.clear()
    _CHECKED_ROW_WEIGHTS[id(row_weight)] = (weakref.ref(row_weight), row_weight._version, M)


# (id(table), version, segments) of row_weight tables whose values were checked against a segment table
_MATCHED_SEGMENTS: dict[tuple, weakref.ref] = {}


def check_row_weight_segments(segments, row_weight: torch.Tensor, table: torch.Tensor) -> tuple:
    """``segments``: ``(start, end, m)`` rows covering the ``row_weight`` rows exactly once and naming the
    same weight as ``row_weight`` on every row (compared once per table version, never under compile)."""
    seg = row_segments(segments, row_weight.shape[0], table.shape[0])
    if torch.compiler.is_compiling() or row_weight.numel() == 0 or row_weight.device.type == "meta":
        return seg
    key = (id(row_weight), row_weight._version, seg)
    ref = _MATCHED_SEGMENTS.get(key)
    if ref is not None and ref() is row_weight:
        return seg
    expected = torch.cat([torch.full((e - s,), m, dtype=torch.int32) for s, e, m in sorted(seg)])
    bad = (row_weight.cpu() != expected).nonzero()
    if bad.numel():
        n = int(bad[0, 0])
        raise ValueError(f"segments: expected the weight index of row_weight on every row; row {n} has "
                         f"row_weight {int(row_weight[n])}, segments name {int(expected[n])}")
    if len(_MATCHED_SEGMENTS) > 4096:
        _MATCHED_SEGMENTS.clear()
    _MATCHED_SEGMENTS[key] = weakref.ref(row_weight)
    return seg
