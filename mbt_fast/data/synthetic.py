"""A synthetic audio-visual classification task where fusion matters; generated on the fly, no download.

Every clip shows one of 6 *visual patterns* (a drifting colour grating: 3 orientations x warm/cool
colour, random phase, speed, contrast and brightness, pixel noise) and plays one of 6 *audio patterns*
(a horizontal band in the spectrogram at one of 6 mel positions, jittered, amplitude-modulated, over
noise with random broadband clicks). The 8 classes use them so that:

| class | audio pattern        | visual pattern       | separable by          |
| ----- | -------------------- | -------------------- | --------------------- |
| 0, 1  | 0, 1                 | 2 or 3 (distractor)  | sound only            |
| 2, 3  | 2 or 3 (distractor)  | 0, 1                 | picture only          |
| 4..7  | 4 + i                | 4 + j                | the conjunction (i, j): class 4 + 2i + j |

Each attribute of the last group is shared by two classes, so either modality alone narrows 4..7 down
to a pair, and the distractors make the other group's pair a coin flip: the best unimodal accuracy is
(2 + 2/2 + 4/2) / 8 = 62.5 %, while fusing both modalities can reach 100 %.

More modalities (``extra_shapes``, e.g. ``{"flow": (T, H, W)}`` or ``{"tokens": (n, d_in)}``): every
clip also carries a *motion bit*, shown by each extra modality and by nothing else -- ``flow``: a patch
of the frame moves right (bit 0) or up (bit 1) over flow noise; a feature sequence (``tokens`` or any
other name): one of its vectors, at a random position, is the bit's prototype over Gaussian features.
Class = AV class + 8 * bit, 16 classes: rgb + spectrogram alone reach at most 50 %, one modality at
most 31.25 %, all of them together 100 %.

Determinism: an example is a function of (dataset seed, split, index) -- or of the ``(index, seed)``
key that :class:`~mbt_fast.data.sampler.ResumableSampler` yields, which gives fresh training examples
every epoch. Items have the same layout as :class:`~mbt_fast.data.dataset.VideoDataset`'s.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from mbt_fast.data.dataset import item_seed

NUM_CLASSES = 8
NUM_PATTERNS = 6
# (audio pattern, visual pattern) choices per class; a tuple means "uniformly one of these"
CLASS_TABLE = {
    0: ((0,), (2, 3)),
    1: ((1,), (2, 3)),
    2: ((2, 3), (0,)),
    3: ((2, 3), (1,)),
    4: ((4,), (4,)),
    5: ((4,), (5,)),
    6: ((5,), (4,)),
    7: ((5,), (5,)),
}
BEST_UNIMODAL_ACCURACY = 0.625


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def make_spectrogram(pattern: int, shape, g: torch.Generator, noise: float = 1.0) -> torch.Tensor:
    """``[time, mel]``, roughly zero-mean unit-variance like a normalised log-mel."""
    t, mel = shape
    x = noise * torch.randn(t, mel, generator=g)
    # a few broadband clicks: structured noise that is the same for every class
    for _ in range(int(torch.randint(0, 4, (), generator=g))):
        at = int(torch.randint(0, t, (), generator=g))
        x[at:at + 2] += _uniform(g, 0.5, 1.5)
    centre = (pattern + 0.5) * mel / NUM_PATTERNS + _uniform(g, -0.6, 0.6) * mel / (4 * NUM_PATTERNS)
    width = max(1.0, mel / 24)
    bins = torch.arange(mel, dtype=torch.float32)
    band = torch.exp(-0.5 * ((bins - centre) / width) ** 2)
    rate, phase = _uniform(g, 1.0, 3.0), _uniform(g, 0, 2 * math.pi)
    envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * rate * torch.arange(t) / t + phase)
    return x + _uniform(g, 1.2, 2.0) * envelope[:, None] * band[None, :]


def make_frames(pattern: int, shape, g: torch.Generator, noise: float = 1.0) -> torch.Tensor:
    """``[3, T, H, W]`` in [-1, 1]."""
    t, h, w = shape
    angle = (pattern % 3) * math.pi / 3 + _uniform(g, -0.15, 0.15)
    warm = pattern < 3
    period = max(4.0, min(h, w) / 4) * _uniform(g, 0.85, 1.15)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    proj = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
    speed = _uniform(g, -0.6, 0.6)  # radians of phase per frame: the grating drifts
    phase0 = _uniform(g, 0, 2 * math.pi)
    grating = torch.sin(proj[None] + phase0 + speed * torch.arange(t, dtype=torch.float32)[:, None, None])  # [T, H, W]
    colour = torch.tensor([1.0, 0.3, -0.6]) if warm else torch.tensor([-0.6, 0.3, 1.0])
    contrast = _uniform(g, 0.35, 0.6)
    x = contrast * colour[:, None, None, None] * grating[None] + _uniform(g, -0.2, 0.2)
    x = x + 0.35 * noise * torch.randn(3, t, h, w, generator=g)
    return x.clamp(-1.0, 1.0)


def make_flow(bit: int, shape, g: torch.Generator, noise: float = 1.0) -> torch.Tensor:
    """``[2, T, H, W]`` (x, y displacement, roughly unit scale): a random rectangle moves right (bit 0)
    or up (bit 1) at a random speed; the rest is flow noise (camera shake, the same for both bits)."""
    t, h, w = shape
    x = 0.5 * noise * torch.randn(2, t, h, w, generator=g)
    x += torch.randn(2, 1, 1, 1, generator=g) * 0.3  # global shake: no information
    ph, pw = max(1, h // 2), max(1, w // 2)
    y0, x0 = int(torch.randint(0, h - ph + 1, (), generator=g)), int(torch.randint(0, w - pw + 1, (), generator=g))
    angle = bit * math.pi / 2 + _uniform(g, -0.3, 0.3)
    speed = _uniform(g, 0.8, 1.5)
    x[0, :, y0:y0 + ph, x0:x0 + pw] += speed * math.cos(angle)
    x[1, :, y0:y0 + ph, x0:x0 + pw] -= speed * math.sin(angle)  # image y points down: "up" is negative
    return x


def make_features(bit: int, shape, g: torch.Generator, noise: float = 1.0) -> torch.Tensor:
    """``[n, d]`` Gaussian features, one of them (random position) the bit's fixed prototype."""
    n, d = shape
    x = noise * torch.randn(n, d, generator=g)
    proto = torch.randn(2, d, generator=torch.Generator().manual_seed(1234 + d))  # fixed per feature width
    # 4 noise standard deviations along the prototype's direction: clear, but only in that direction
    x[int(torch.randint(0, n, (), generator=g))] += 4.0 * proto[bit] / proto[bit].norm()
    return x


class SyntheticAVDataset(Dataset):
    """The task of the module docstring at the model's input shapes (tiny: rgb (8, 32, 32), spec (64, 32));
    ``extra_shapes`` adds modalities and the motion bit (16 classes)."""

    multi_label = False

    def __init__(self, size: int, rgb_shape=(8, 32, 32), spectrogram_shape=(64, 32), seed: int = 0,
                 split: str = "train", noise: float = 1.0, modalities=("spectrogram", "rgb"), extra_shapes=None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.seed, self.split, self.noise = size, seed, split, noise
        self.rgb_shape, self.spectrogram_shape = tuple(rgb_shape), tuple(spectrogram_shape)
        self.extra_shapes = {m: tuple(v) for m, v in (extra_shapes or {}).items()}
        for m, v in self.extra_shapes.items():
            if m in ("rgb", "spectrogram") or len(v) != (3 if m == "flow" else 2) or min(v) < 1:
                raise ValueError(f"extra_shapes[{m!r}]: expected flow (T, H, W) or a feature sequence (n, d_in) "
                                 f"of positive sizes for a modality other than rgb and spectrogram, got {v}")
        self.modalities = tuple(modalities)
        unknown = [m for m in self.modalities if m not in ("rgb", "spectrogram", *self.extra_shapes)]
        if unknown:
            raise ValueError(f"modalities: {unknown} need a shape in extra_shapes, got {self.extra_shapes}")
        self.num_classes = NUM_CLASSES * (2 if self.extra_shapes else 1)

    @property
    def best_unimodal_accuracy(self) -> float:
        return BEST_UNIMODAL_ACCURACY / (2 if self.extra_shapes else 1)

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        g = torch.Generator().manual_seed(item_seed("synthetic", self.seed, self.split, index, seed))
        label = int(torch.randint(0, NUM_CLASSES, (), generator=g))
        audio_choices, visual_choices = CLASS_TABLE[label]
        a = audio_choices[int(torch.randint(0, len(audio_choices), (), generator=g))]
        v = visual_choices[int(torch.randint(0, len(visual_choices), (), generator=g))]
        item = {"index": index, "audio_missing": False}
        spec = make_spectrogram(a, self.spectrogram_shape, g, self.noise)
        rgb = make_frames(v, self.rgb_shape, g, self.noise)
        if "spectrogram" in self.modalities:
            item["spectrogram"] = spec
        if "rgb" in self.modalities:
            item["rgb"] = rgb
        if self.extra_shapes:  # drawn after the AV pair, so the AV part of an item is the 2-modality task's
            bit = int(torch.randint(0, 2, (), generator=g))
            for m, shape in self.extra_shapes.items():
                x = (make_flow if m == "flow" else make_features)(bit, shape, g, self.noise)
                if m in self.modalities:
                    item[m] = x
            label += NUM_CLASSES * bit
        item["label"] = torch.nn.functional.one_hot(torch.tensor(label), self.num_classes).float()
        return item
