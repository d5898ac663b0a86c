"""``MBTConfig``: Scenic's MBT model fields, presets, and conversion from Scenic config dicts."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from mbt_fast.modalities import get_embedding, registered_modalities

_CLASSIFIERS = ("token", "0", "gap", "gmp", "gsp")
# field -> smallest value; ints must be true ints (JSON "64" or 4.0 is a mistake, not a size)
_INT_FIELDS = {"hidden_size": 1, "num_heads": 1, "mlp_dim": 1, "num_layers": 1, "fusion_layer": 0, "n_bottlenecks": 0,
               "num_classes": 1}
_BOOL_FIELDS = ("use_bottleneck", "share_encoder", "test_with_bottlenecks")
_RATE_FIELDS = ("dropout_rate", "attention_dropout_rate", "stochastic_droplayer_rate")
# Scenic MBT arguments that are not model fields here: accepted in a flat config and ignored
_SCENIC_IGNORED = frozenset({"patches", "temporal_encoding_config", "attention_config", "return_prelogits",
                             "return_preclassifier", "dtype"})


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type_name(v) -> str:
    return f"{v!r} ({type(v).__name__})"


@dataclass(frozen=True)
class MBTConfig:
    """Model configuration with Scenic's field names (``scenic/projects/mbt/model.py``).

    ``patches_size`` is Scenic's ``patches.size`` = ``[h, w, t]``; the spectrogram uses ``[h, w]`` as
    (time, mel). ``modality_fusion`` lists any modalities of :mod:`mbt_fast.modalities` (two or more
    fuse through the bottleneck); ``input_shapes`` gives each its layout there (Scenic's for rgb
    ``[B, T, H, W, 3]`` and spectrogram ``[B, time, mel, 3]``; flow ``[B, T, H, W, 2]``, tokens
    ``[B, n, d_in]``) and fixes the token grids; the batch entry is ignored.
    """

    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    fusion_layer: int = 8
    n_bottlenecks: int = 4
    num_classes: int = 527
    patches_size: tuple[int, int, int] = (16, 16, 2)
    classifier: str = "token"
    use_bottleneck: bool = True
    share_encoder: bool = False
    modality_fusion: tuple[str, ...] = ("spectrogram", "rgb")
    test_with_bottlenecks: bool = True
    temporal_encoding_method: str = "3d_conv"
    representation_size: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_droplayer_rate: float = 0.0
    input_shapes: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: {"rgb": (-1, 32, 224, 224, 3), "spectrogram": (-1, 800, 128, 3)})

    def __post_init__(self):
        self._check_types()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        set_("patches_size", tuple(int(p) for p in self.patches_size))
        set_("modality_fusion", tuple(self.modality_fusion))
        set_("input_shapes", {k: tuple(int(d) for d in v) for k, v in dict(self.input_shapes).items()})
        for name in _INT_FIELDS:
            set_(name, int(getattr(self, name)))
        if self.representation_size is not None:
            set_("representation_size", int(self.representation_size))
        for name in _RATE_FIELDS:
            set_(name, float(getattr(self, name)))
        self.validate()

    def _check_types(self) -> None:
        """Types before anything is converted: a string, a float or a bool where a size belongs is a
        config mistake that ``int()`` or ``bool()`` would hide."""
        def bad(name, expected, value):
            raise TypeError(f"{name}: expected {expected}, got {_type_name(value)}")

        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                bad(name, "an int", getattr(self, name))
        if self.representation_size is not None and not _is_int(self.representation_size):
            bad("representation_size", "an int or None", self.representation_size)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool (JSON true/false)", getattr(self, name))
        for name in _RATE_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                bad(name, "a number", v)
        for name in ("classifier", "temporal_encoding_method"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a string", getattr(self, name))
        if isinstance(self.modality_fusion, str) or not isinstance(self.modality_fusion, (list, tuple)):
            bad("modality_fusion", "a list of modality names", self.modality_fusion)
        if isinstance(self.patches_size, str) or not isinstance(self.patches_size, (list, tuple)) \
                or not all(_is_int(p) for p in self.patches_size):
            bad("patches_size", "a list of 3 ints [h, w, t]", self.patches_size)
        if not isinstance(self.input_shapes, Mapping):
            bad("input_shapes", "a dict {modality: shape}", self.input_shapes)
        for k, v in self.input_shapes.items():
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(_is_int(d) for d in v):
                bad(f"input_shapes[{k!r}]", "a list of ints", v)

    def validate(self) -> None:
        def bad(name, expected, actual):
            raise ValueError(f"{name}: expected {expected}, got {actual!r}")

        for name, lo in _INT_FIELDS.items():
            if getattr(self, name) < lo:
                bad(name, f">= {lo}", getattr(self, name))
        if self.representation_size is not None and self.representation_size < 1:
            bad("representation_size", "None or >= 1", self.representation_size)
        if len(self.patches_size) == 3 and min(self.patches_size) < 1:
            bad("patches_size", "positive [h, w, t]", self.patches_size)
        for name in _RATE_FIELDS:
            if not math.isfinite(getattr(self, name)):
                bad(name, "a finite rate in [0, 1)", getattr(self, name))

        if not self.modality_fusion or len(set(self.modality_fusion)) != len(self.modality_fusion):
            bad("modality_fusion", f"distinct names from {registered_modalities()}", self.modality_fusion)
        for m in self.modality_fusion:
            get_embedding(m)  # raises, naming the registered modalities
        if self.classifier not in _CLASSIFIERS:
            bad("classifier", f"one of {_CLASSIFIERS}", self.classifier)
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"a multiple of num_heads={self.num_heads}", self.hidden_size)
        if not 0 <= self.fusion_layer <= self.num_layers:
            bad("fusion_layer", f"0 <= fusion_layer <= num_layers={self.num_layers}", self.fusion_layer)
        if len(self.patches_size) != 3:
            bad("patches_size", "[h, w, t]", self.patches_size)
        if self.temporal_encoding_method != "3d_conv":
            bad("temporal_encoding_method", "'3d_conv' (the method of the released models)", self.temporal_encoding_method)
        if self.use_bottleneck and self.n_bottlenecks < 0:
            bad("n_bottlenecks", ">= 0", self.n_bottlenecks)
        for m in self.modality_fusion:
            if m not in self.input_shapes:
                bad("input_shapes", f"an entry for modality {m!r}", self.input_shapes)
            try:
                get_embedding(m).token_grid(self.input_shapes[m][1:], self.patches_size)
            except ValueError as e:
                raise ValueError(f"input_shapes[{m!r}]: {e}") from None
        for name in ("dropout_rate", "attention_dropout_rate", "stochastic_droplayer_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a rate in [0, 1)", getattr(self, name))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rgb_shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the RGB input."""
        return tuple(self.input_shapes["rgb"][1:4])

    @property
    def spectrogram_shape(self) -> tuple[int, int]:
        """(time, mel) of the spectrogram input."""
        return tuple(self.input_shapes["spectrogram"][1:3])

    @property
    def has_cls(self) -> bool:
        return self.classifier in ("token", "0")

    def patch_grid(self, modality: str) -> tuple[int, ...]:
        """The token grid of ``modality`` (CLS excluded), in token order."""
        return get_embedding(modality).token_grid(self.input_shapes[modality][1:], self.patches_size)

    def input_shape(self, modality: str) -> tuple[int, ...]:
        """One sample's model input for ``modality`` (e.g. rgb ``(3, T, H, W)``)."""
        return get_embedding(modality).input_shape(self.input_shapes[modality][1:])

    def num_patches(self, modality: str) -> int:
        n = 1
        for g in self.patch_grid(modality):
            n *= g
        return n

    def num_tokens(self, modality: str) -> int:
        """Tokens of one modality entering the encoder (CLS included)."""
        return self.num_patches(modality) + int(self.has_cls)

    @property
    def num_bottleneck_tokens(self) -> int:
        """Rows of the ``bottleneck`` parameter: n_bottlenecks (+1 with the token classifier)."""
        return self.n_bottlenecks + int(self.has_cls) if self.use_bottleneck else 0

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_scenic(cls, config: Mapping[str, Any], strict: bool | None = None) -> "MBTConfig":
        """Build from Scenic's flat model fields (the fixtures' ``config.json``) or its nested layout
        (``config.model`` with ``patches.size`` and ``temporal_encoding_config.method``, plus
        ``config.dataset_configs``).

        Unknown keys: a flat dict is strict by default (a typo such as ``fusion_layers`` is an error
        that suggests the field; Scenic's MBT arguments without a meaning here, e.g. ``attention_config``
        or ``dtype``, are accepted); a nested Scenic config is not (its trainer keys are expected) and
        the ignored ``config.model`` keys are listed in a warning. ``strict=True``/``False`` forces either.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict of Scenic model fields, got {type(config).__name__}")
        config = dict(config)
        nested = isinstance(config.get("model"), Mapping)
        strict = (not nested) if strict is None else strict
        names = {f.name for f in dataclasses.fields(cls)}
        model_keys = set(config["model"]) if nested else set(config)
        unknown = sorted(k for k in model_keys - names - _SCENIC_IGNORED)
        if unknown and strict:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), sorted(names), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"config: unknown model field(s) {', '.join(hints)}; expected names from "
                             f"{sorted(names)} (pass strict=False to ignore them)")
        if unknown and nested:
            warnings.warn(f"MBTConfig.from_scenic ignored config.model keys that are not model fields: {unknown}",
                          UserWarning, stacklevel=2)
        flat = dict(config["model"]) if nested else {}
        flat.update({k: v for k, v in config.items() if k != "model"})
        if isinstance(flat.get("patches"), Mapping) and "size" in flat["patches"]:
            flat.setdefault("patches_size", flat["patches"]["size"])
        tec = flat.get("temporal_encoding_config")
        if isinstance(tec, Mapping) and "method" in tec:
            flat.setdefault("temporal_encoding_method", tec["method"])
        if "input_shapes" not in flat and isinstance(config.get("dataset_configs"), Mapping):
            ds = config["dataset_configs"]
            shapes = {}
            if "num_frames" in ds and "crop_size" in ds:
                shapes["rgb"] = (-1, ds["num_frames"], ds["crop_size"], ds["crop_size"], 3)
            if "num_spec_frames" in ds:
                per_sec = ds.get("spec_shape", (100, 128))
                shapes["spectrogram"] = (-1, ds["num_spec_frames"] * per_sec[0], per_sec[1], 3)
            if shapes:
                flat["input_shapes"] = shapes
        return cls(**{k: v for k, v in flat.items() if k in names})

    @classmethod
    def from_json(cls, path, strict: bool | None = None) -> "MBTConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read an MBT config (a JSON object of Scenic model fields): {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of Scenic model fields, got {type(data).__name__}")
        try:
            return cls.from_scenic(data, strict=strict)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        d["patches_size"] = list(self.patches_size)
        d["modality_fusion"] = list(self.modality_fusion)
        return d

    @classmethod
    def preset(cls, name: str, **overrides) -> "MBTConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)


_MBT_B = MBTConfig()  # the released AudioSet AV model: token classifier, fusion layer 8, 4 bottlenecks
PRESETS: dict[str, MBTConfig] = {
    "mbt_base_16x2": _MBT_B,
    "mbt_base_16x2_spec": dataclasses.replace(_MBT_B, modality_fusion=("spectrogram",), use_bottleneck=False,
                                               input_shapes={"spectrogram": (-1, 800, 128, 3)}),
    "mbt_base_16x2_rgb": dataclasses.replace(_MBT_B, modality_fusion=("rgb",), use_bottleneck=False,
                                              input_shapes={"rgb": (-1, 32, 224, 224, 3)}),
    # small enough to train on a CPU in minutes: 16 RGB tokens + 8 spectrogram tokens (+ CLS each)
    "tiny": MBTConfig(hidden_size=64, num_heads=2, mlp_dim=128, num_layers=4, fusion_layer=2, n_bottlenecks=4,
                      num_classes=10, input_shapes={"rgb": (-1, 8, 32, 32, 3), "spectrogram": (-1, 64, 32, 3)}),
}
# MBT-B with optical flow at the RGB clip's size as a third modality (two-stream video + audio)
PRESETS["mbt_base_16x2_flow"] = dataclasses.replace(_MBT_B, modality_fusion=("spectrogram", "rgb", "flow"),
                                                    input_shapes={**_MBT_B.input_shapes, "flow": (-1, 32, 224, 224, 2)})
# tiny with a third modality, 2-channel optical flow at the RGB clip's size (+16 tokens, + CLS)
PRESETS["tiny_trimodal"] = dataclasses.replace(PRESETS["tiny"], modality_fusion=("spectrogram", "rgb", "flow"),
                                               input_shapes={**PRESETS["tiny"].input_shapes, "flow": (-1, 8, 32, 32, 2)})
