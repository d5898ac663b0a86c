"""Modalities: the registry of names ``MBTConfig.modality_fusion`` may list, each with its tokenizer.

A modality is a name with an entry in ``input_shapes`` (channels-last, as Scenic's configs; the batch
entry is ignored) and an *embedding*: the module that turns the model input into ``[B, n, C]`` tokens.
The model adds the CLS token and the positional embedding; the encoder, the packed layout and the
kernels know nothing of modalities beyond their token counts.

Built in:

=============== ============================ ====================== =====================================
name            ``input_shapes`` entry       model input            embedding
=============== ============================ ====================== =====================================
``rgb``         ``[B, T, H, W, 3]``          ``[B, 3, T, H, W]``    tubelets (Conv3d, Scenic's)
``spectrogram`` ``[B, time, mel, 3]``        ``[B, time, mel]``     patches (Conv2d on one channel, Scenic's)
``flow``        ``[B, T, H, W, 2]``          ``[B, 2, T, H, W]``    tubelets of 2-channel optical flow
``tokens``      ``[B, n, d_in]``             ``[B, n, d_in]``       a linear projection of precomputed features
=============== ============================ ====================== =====================================

A ragged feature sequence (``tokens`` or another ``FeatureEmbedding`` modality) takes per-sample
lengths, ``model(..., lengths={"tokens": L})``: the rows past ``L[b]`` are padding, which no attention
attends to and no pooling reads.

``register_modality(name, embedding)`` adds one: ``embedding`` is an ``nn.Module`` subclass with the
contract of :class:`ModalityEmbedding` (``FeatureEmbedding`` serves any feature sequence, e.g.
``register_modality("text", FeatureEmbedding)``). Registration is per process: register before building
or loading a model that names it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# names the model uses for other things: output keys (embed/_pool), the shared block, forward's arguments
RESERVED_NAMES = frozenset({"all", "mean", "bottleneck", "shared", "missing", "lengths", "label", "index"})


def _lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
    """Flax's ``lecun_normal``: a normal truncated at 2 std, the std corrected for the truncation."""
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class ModalityEmbedding:
    """The contract of a modality's embedding; mix it into the ``nn.Module`` that holds the parameters.

    Subclasses set ``config_layout`` and ``input_layout`` (for error messages) and implement the four
    methods below. ``token_grid`` and ``input_shape`` read the ``input_shapes`` entry without its batch
    dimension; ``token_grid`` raises ``ValueError("expected ..., got ...")`` for a shape it cannot take.
    """

    config_layout = "[B, ...]"
    input_layout = "[B, ...]"
    ragged = False  # True: one token per input row, so a per-sample length can mask the padding rows

    @classmethod
    def token_grid(cls, shape: tuple[int, ...], patches_size: tuple[int, int, int]) -> tuple[int, ...]:
        """The token grid (CLS excluded) in the embedding's output order."""
        raise NotImplementedError

    @classmethod
    def input_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        """One sample's model input."""
        raise NotImplementedError

    @classmethod
    def create(cls, shape: tuple[int, ...], patches_size: tuple[int, int, int], dim: int) -> nn.Module:
        raise NotImplementedError

    def reset_scenic(self) -> None:
        """Scenic's initialiser (Flax ``lecun_normal`` kernels, zero biases)."""
        raise NotImplementedError


def _check_rank(shape, rank: int, layout: str) -> None:
    if len(shape) != rank - 1 or min(shape) < 1:
        raise ValueError(f"expected {rank} dims {layout} with positive sizes, got {(-1, *shape)}")


class TubeletEmbedding(nn.Conv3d, ModalityEmbedding):
    """Non-overlapping ``(t, h, w)`` tubelets of a ``channels``-channel video, time-major token order."""

    channels = 3

    def __init__(self, dim: int, tubelet: tuple[int, int, int]):
        super().__init__(self.channels, dim, tubelet, stride=tubelet)

    @classmethod
    def _layouts(cls):
        return f"[B, T, H, W, {cls.channels}]", f"[B, {cls.channels}, T, H, W]"

    @classmethod
    def token_grid(cls, shape, patches_size):
        layout = cls._layouts()[0]
        _check_rank(shape, 5, layout)
        if shape[3] != cls.channels:
            raise ValueError(f"expected {layout} ({cls.channels} channels last), got {(-1, *shape)}")
        (t, h, w), (fh, fw, ft) = shape[:3], patches_size
        if t % ft or h % fh or w % fw:
            raise ValueError(f"expected T, H, W divisible by the tubelet (t={ft}, h={fh}, w={fw}), got {(-1, *shape)}")
        return (t // ft, h // fh, w // fw)

    @classmethod
    def input_shape(cls, shape):
        return (cls.channels, *shape[:3])

    @classmethod
    def create(cls, shape, patches_size, dim):
        fh, fw, ft = patches_size
        return cls(dim, (ft, fh, fw))

    def reset_scenic(self):
        _lecun_normal_(self.weight, self.weight[0].numel())
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype)).flatten(2).transpose(1, 2)  # Flax's reshape order


class RGBEmbedding(TubeletEmbedding):
    """Scenic's RGB tubelets; the input is in [-1, 1]."""

    channels = 3
    config_layout, input_layout = "[B, T, H, W, 3]", "[B, 3, T, H, W]"


class FlowEmbedding(TubeletEmbedding):
    """Tubelets of optical flow (x, y displacement channels), the RGB stream's design with 2 channels;
    ``mbt_fast.vit_init.flow_from_rgb`` initialises it from an RGB embedding as two-stream work does."""

    channels = 2
    config_layout, input_layout = "[B, T, H, W, 2]", "[B, 2, T, H, W]"


class SpectrogramEmbedding(nn.Conv2d, ModalityEmbedding):
    """Scenic's spectrogram patches. Scenic tiles the spectrogram to 3 identical channels; one channel
    with the kernel summed over them is the same function."""

    config_layout, input_layout = "[B, time, mel, 3]", "[B, time, mel]"

    def __init__(self, dim: int, patch: tuple[int, int]):
        super().__init__(1, dim, patch, stride=patch)

    @classmethod
    def token_grid(cls, shape, patches_size):
        _check_rank(shape, 4, cls.config_layout)
        (t, f), (fh, fw, _) = shape[:2], patches_size
        if t % fh or f % fw:
            raise ValueError(f"expected time, mel divisible by the patch ({fh}, {fw}), got {(-1, *shape)}")
        return (t // fh, f // fw)

    @classmethod
    def input_shape(cls, shape):
        return tuple(shape[:2])

    @classmethod
    def create(cls, shape, patches_size, dim):
        return cls(dim, tuple(patches_size[:2]))

    def reset_scenic(self):
        _lecun_normal_(self.weight, self.weight[0].numel() * 3)  # the fan-in of Scenic's 3 tiled channels
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return super().forward(x.unsqueeze(1).to(self.weight.dtype)).flatten(2).transpose(1, 2)


class FeatureEmbedding(nn.Linear, ModalityEmbedding):
    """A precomputed feature sequence ``[B, n, d_in]`` (text-encoder outputs, IMU windows, another
    model's features), projected to the model width; one token per feature vector."""

    config_layout = input_layout = "[B, n, d_in]"
    ragged = True

    @classmethod
    def token_grid(cls, shape, patches_size):
        _check_rank(shape, 3, cls.config_layout)
        return (shape[0],)

    @classmethod
    def input_shape(cls, shape):
        return tuple(shape[:2])

    @classmethod
    def create(cls, shape, patches_size, dim):
        return cls(shape[1], dim)

    def reset_scenic(self):
        _lecun_normal_(self.weight, self.in_features)  # Flax Dense's default
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


_REGISTRY: dict[str, type] = {"rgb": RGBEmbedding, "spectrogram": SpectrogramEmbedding, "flow": FlowEmbedding,
                              "tokens": FeatureEmbedding}
BUILTIN_MODALITIES = tuple(_REGISTRY)
SCENIC_MODALITIES = ("rgb", "spectrogram")  # Scenic's _MODALITIES, in its order


def register_modality(name: str, embedding: type, replace: bool = False) -> None:
    """Make ``name`` usable in ``modality_fusion``, tokenized by ``embedding`` (module doc)."""
    if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_NAMES:
        raise ValueError(f"name: expected a Python identifier not in {sorted(RESERVED_NAMES)} (it names "
                         f"parameters such as embed_<name>), got {name!r}")
    if not (isinstance(embedding, type) and issubclass(embedding, nn.Module) and issubclass(embedding, ModalityEmbedding)):
        raise TypeError(f"embedding: expected an nn.Module subclass mixing in mbt_fast.modalities.ModalityEmbedding, "
                        f"got {embedding!r}")
    if name in BUILTIN_MODALITIES and _REGISTRY[name] is not embedding:
        raise ValueError(f"name: {name!r} is built in; pick another name")
    if name in _REGISTRY and _REGISTRY[name] is not embedding and not replace:
        raise ValueError(f"name: {name!r} is registered already (to {_REGISTRY[name].__name__}); pass replace=True")
    _REGISTRY[name] = embedding


def registered_modalities() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_embedding(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"modality_fusion: {name!r} is not a registered modality (registered: "
                         f"{', '.join(_REGISTRY)}); register it with mbt_fast.register_modality first")
    return _REGISTRY[name]


def scenic_order(modalities) -> tuple[str, ...]:
    """Scenic's modalities first in Scenic's order, then the others in the given order: the order of
    vanilla fusion's context tokens and of parameter creation (which fixes the seeded initialisation)."""
    mods = tuple(modalities)
    return tuple(m for m in SCENIC_MODALITIES if m in mods) + tuple(m for m in mods if m not in SCENIC_MODALITIES)
