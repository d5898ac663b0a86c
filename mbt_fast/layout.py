"""The packed token buffer shared by every fast backend (DESIGN.md section 3).

All modalities of a sample live in one buffer, each modality followed by its own copy of the
bottleneck rows::

    [ spec tokens (CLS + 400) | bottleneck_s (nb) | rgb tokens (CLS + 3136) | bottleneck_r (nb) ]

The buffer is stored **token-major**, ``[N, B, C]``: a modality's rows for the whole batch are one
contiguous block of memory, so per-modality GEMMs run on plain 2-D views and write their output in
place, with no gather or concat.

Two tables describe a layer to the kernels:

* ``row_weight`` (int32 ``[N]``): the modality whose weights (LayerNorm, Linear bias) apply to each
  row. A bottleneck slot uses the weights of the modality it follows.
* ``attn_segments`` (int32 ``[S, 4]``): ``(q_start, q_end, k_start, k_end)`` per segment; the queries in
  ``[q_start, q_end)`` attend to exactly the keys in ``[k_start, k_end)``. Query ranges are disjoint;
  query rows in no segment get a zero output (and zero gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PackedLayout:
    """Row offsets of the packed buffer.

    Args:
        modalities: modality names in buffer order (Scenic's ``modality_fusion`` order).
        tokens: rows of each modality (CLS included).
        n_bottleneck: rows of each modality's bottleneck slot (0 without bottlenecks).
    """

    modalities: tuple[str, ...]
    tokens: tuple[int, ...]
    n_bottleneck: int
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)  # first row of each modality

    def __post_init__(self):
        if len(self.modalities) != len(self.tokens) or not self.modalities:
            raise ValueError(f"modalities {self.modalities} and tokens {self.tokens} must be non-empty and of equal length")
        if self.n_bottleneck < 0 or any(t <= 0 for t in self.tokens):
            raise ValueError(f"token counts must be positive and n_bottleneck >= 0, got {self.tokens}, {self.n_bottleneck}")
        # computed once here, not lazily: a plain attribute is what torch.compile traces without a break
        offsets, o = [], 0
        for t in self.tokens:
            offsets.append(o)
            o += t + self.n_bottleneck
        object.__setattr__(self, "offsets", tuple(offsets))

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def total_rows(self) -> int:
        return sum(self.tokens) + self.num_modalities * self.n_bottleneck

    def modality_rows(self, m: int) -> slice:
        return slice(self.offsets[m], self.offsets[m] + self.tokens[m])

    def bottleneck_rows(self, m: int) -> slice:
        start = self.offsets[m] + self.tokens[m]
        return slice(start, start + self.n_bottleneck)

    def block_rows(self, m: int) -> slice:
        """Modality ``m`` together with its bottleneck slot."""
        return slice(self.offsets[m], self.offsets[m] + self.tokens[m] + self.n_bottleneck)

    def row_segments(self) -> tuple[tuple[int, int, int], ...]:
        """``(start, end, modality)`` for every modality's rows plus its bottleneck slot."""
        return tuple((s.start, s.stop, m) for m, s in enumerate(map(self.block_rows, range(self.num_modalities))))

    def attn_segments(self, fused: bool) -> tuple[tuple[int, int, int, int], ...]:
        """Key ranges of a layer: ``[modality | its bottleneck]`` when fused, ``[modality]`` otherwise."""
        rows = self.block_rows if fused else self.modality_rows
        return tuple((s.start, s.stop, s.start, s.stop) for s in map(rows, range(self.num_modalities)))

    def row_weight(self, device=None) -> torch.Tensor:
        idx = torch.empty(self.total_rows, dtype=torch.int32)
        for start, end, m in self.row_segments():
            idx[start:end] = m
        return idx.to(device) if device is not None else idx

    def segments_tensor(self, segments, device=None) -> torch.Tensor:
        t = torch.tensor(segments, dtype=torch.int32).reshape(-1, 4)
        return t.to(device) if device is not None else t
