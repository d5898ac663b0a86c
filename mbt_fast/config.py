"""``MBTConfig``: Scenic's MBT model fields, presets, and conversion from Scenic config dicts."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

MODALITIES = ("spectrogram", "rgb")
_CLASSIFIERS = ("token", "0", "gap", "gmp", "gsp")


@dataclass(frozen=True)
class MBTConfig:
    """Model configuration with Scenic's field names (``scenic/projects/mbt/model.py``).

    ``patches_size`` is Scenic's ``patches.size`` = ``[h, w, t]``; the spectrogram uses ``[h, w]`` as
    (time, mel). ``input_shapes`` uses Scenic's layouts (rgb ``[B, T, H, W, 3]``, spectrogram
    ``[B, time, mel, 3]``) and fixes the token grids; the batch entry is ignored.
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
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        set_("patches_size", tuple(int(p) for p in self.patches_size))
        set_("modality_fusion", tuple(self.modality_fusion))
        set_("input_shapes", {k: tuple(int(d) for d in v) for k, v in dict(self.input_shapes).items()})
        self.validate()

    def validate(self) -> None:
        def bad(name, expected, actual):
            raise ValueError(f"{name}: expected {expected}, got {actual!r}")

        if not self.modality_fusion or any(m not in MODALITIES for m in self.modality_fusion) \
                or len(set(self.modality_fusion)) != len(self.modality_fusion):
            bad("modality_fusion", f"distinct names from {MODALITIES}", self.modality_fusion)
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
        fh, fw, ft = self.patches_size
        for m in self.modality_fusion:
            if m not in self.input_shapes:
                bad("input_shapes", f"an entry for modality {m!r}", self.input_shapes)
        if "rgb" in self.modality_fusion:
            t, h, w = self.rgb_shape
            if t % ft or h % fh or w % fw:
                bad("input_shapes['rgb']", f"T, H, W divisible by the tubelet (t={ft}, h={fh}, w={fw})", self.input_shapes["rgb"])
        if "spectrogram" in self.modality_fusion:
            t, f = self.spectrogram_shape
            if t % fh or f % fw:
                bad("input_shapes['spectrogram']", f"time, mel divisible by the patch ({fh}, {fw})", self.input_shapes["spectrogram"])
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
        fh, fw, ft = self.patches_size
        if modality == "rgb":
            t, h, w = self.rgb_shape
            return (t // ft, h // fh, w // fw)
        t, f = self.spectrogram_shape
        return (t // fh, f // fw)

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
    def from_scenic(cls, config: Mapping[str, Any]) -> "MBTConfig":
        """Build from Scenic's flat model fields (the fixtures' ``config.json``) or its nested layout
        (``config.model`` with ``patches.size`` and ``temporal_encoding_config.method``, plus
        ``config.dataset_configs``); keys that are not model fields are ignored."""
        config = dict(config)
        flat = dict(config.get("model", {})) if isinstance(config.get("model"), Mapping) else {}
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
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in flat.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "MBTConfig":
        with open(path) as f:
            return cls.from_scenic(json.load(f))

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
