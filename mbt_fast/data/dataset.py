"""A dataset of audio-visual video files with labels, and the pieces that make loading robust.

Sources:
- a CSV with rows ``path,labels`` (labels: class indices separated by ``;`` or spaces -- several per
  clip for AudioSet-style multi-label, one for VGGSound-style single label; an optional header row whose
  first cell is ``path``/``file``/``filename``/``video``; relative paths resolve against ``root`` or the
  CSV's folder);
- a folder ``root/<class name>/<clip>.{mp4,mkv,webm,...}`` (single label, classes in sorted order).

Items are dicts: ``rgb`` ``[3, T, H, W]`` in [-1, 1], ``spectrogram`` ``[time, mel]`` normalised,
``label`` float ``[num_classes]`` (multi-hot, or one-hot for single label), ``index``, ``audio_missing``,
and the sidecar modalities below. With ``num_clips > 1`` (test mode) every modality gets a leading clip
axis ``[K, ...]``.

Sidecar modalities, precomputed ``.npy`` files beside the video (:mod:`mbt_fast.data.sidecar`): for
``clips/a.mp4`` and modality ``m`` the file is ``clips/a.m.npy``, or ``<flow_root>/a.flow.npy`` /
``<features_root>/a.m.npy`` when those folders are given.

- ``flow``: optical flow ``[F, H, W, 2]`` float16/float32, at the video's frame size ``H x W``; channel 0
  the horizontal (x), 1 the vertical (y) displacement in source pixels; field ``f`` is the flow from source
  frame ``f`` to ``f + 1``, one per source frame (``F`` = frames, or frames - 1: the last frame then uses
  the last field). ``item["flow"]`` is float32 ``[2, T, h, w]`` (``flow_shape``): the fields of the RGB
  clip's source frames, resized, cropped and flipped exactly as the RGB clip (``flow_shape``'s ``(h, w)``
  may differ from ``rgb_shape``'s: the RGB crop box is then resized to it), displacements scaled by each
  axis's resize factor and x negated when flipped, then divided by ``flow_scale`` pixels (default 20) and
  clamped to [-1, 1]. Without ``rgb`` the clip and crop are drawn for ``flow_shape`` the same way, from
  the video's packet timestamps (no frame decoded). Not available from a prepared cache.
- any other name ``m`` (not ``rgb``/``spectrogram``/``flow``): a feature sequence ``[rows, d_in]`` (float),
  e.g. text-encoder outputs or IMU windows, with ``feature_shapes[m] = (n, d_in)``. ``item[m]`` is float32
  ``[n, d_in]``: the first ``n`` rows, zero-padded when the file has fewer; ``item[f"{m}_length"]`` (int)
  = ``min(rows, n)``, the rows holding data (for a padding mask). Features are per file: with
  ``num_clips > 1`` the same sequence is repeated on the clip axis.

A missing or unreadable sidecar file, or one whose dtype/shape does not fit (flow: the video's frame
count and size; features: ``d_in``), skips the item as an unreadable video does, the reason naming the
file, the expected and the actual shape; never zeros in its place.

Robustness: an unreadable/corrupt file (no video stream, no decodable frame, unreadable container)
gives a ``{"skipped": reason}`` item (warning logged, counted); :func:`collate_skip_bad` drops those and
reports how many were dropped, so an epoch never crashes on a bad file. A missing or empty audio track
gives an all-zero spectrogram and ``audio_missing=True`` (counted). A file the seek path could not be
trusted on is decoded from the start (``decode_fallback=True``, counted, see :mod:`mbt_fast.data.video`).
``VideoDataset.stats`` counts all of these in this process (each DataLoader worker has its own copy;
the per-batch counts of :func:`collate_skip_bad` are what reaches the training loop).
"""
from __future__ import annotations

import collections
import csv
import hashlib
import logging
import numbers
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mbt_fast.data import audio as audio_lib
from mbt_fast.data.augment import spec_augment_freq
from mbt_fast.data.sidecar import SidecarError, check_flow, flow_clip, open_flow, read_features, sidecar_path
from mbt_fast.data.video import DecodedClips, read_clips

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
AUDIOSET_NUM_CLASSES = 527
MODES = ("train", "eval", "test")
BUILTIN_MODALITIES = ("rgb", "spectrogram", "flow")  # any other modality is a feature sequence
# item and batch keys of their own (collate_skip_bad), so not modality names
RESERVED_KEYS = ("label", "index", "skipped", "audio_missing", "decode_fallback", "num_skipped", "num_audio_missing",
                 "num_decode_fallback")


def parse_labels(text: str) -> list[int]:
    parts = [p for p in text.replace(";", " ").replace("|", " ").split() if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"labels must be integer class indices separated by ';' or spaces, got {text!r}") from None


def csv_rows(csv_path, root=None):
    """``(line number, path, row)`` per clip row of a CSV whose first column is a path (blank and ``#``
    rows and an optional header skipped; relative paths resolved against ``root`` or the CSV's folder)."""
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    if not csv_path.is_file():
        raise ValueError(f"CSV {str(csv_path)!r} {'is a directory' if csv_path.is_dir() else 'does not exist'}")
    with open(csv_path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if i == 0 and row[0].strip().lower() in ("path", "file", "filename", "video"):
                continue
            path = Path(row[0].strip())
            yield i + 1, str(path if path.is_absolute() else base / path), row


def read_csv(csv_path, root=None) -> list[tuple[str, list[int]]]:
    items = []
    for line, path, row in csv_rows(csv_path, root):
        if len(row) < 2:
            raise ValueError(f"{csv_path}:{line}: expected 'path,labels', got {row!r}")
        items.append((path, parse_labels(",".join(row[1:]))))
    if not items:
        raise ValueError(f"CSV {str(csv_path)!r} lists no clip (expected rows 'path,labels')")
    return items


def read_folder(root) -> tuple[list[tuple[str, list[int]]], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data folder {str(root)!r} has no class sub-folders (expected root/<class>/<clip>.mp4)")
    items = []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in VIDEO_EXTENSIONS:
                items.append((str(f), [c]))
    return items, classes


_FREED_MEMORY_KEPT: bool | None = None  # what keep_freed_memory() returned in this process (None: not called)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory this process frees for its next allocations instead of handing it
    back to the OS. :class:`VideoDataset` calls it on its first item in a DataLoader worker.

    Why: every item's clip is a new tensor (19 MB of float32 at MBT-B shapes) and a worker frees a batch's
    items together after the collate; glibc then gives the top of its heap back to the OS, and the next
    batch's items fault every page in again, zeroed by the kernel (~5k page faults per item, several ms).
    Now chunks up to 32 MB (glibc's largest mmap threshold) come from the heap and the heap is never trimmed:
    a worker keeps the memory of its busiest moment. Returns False where malloc is not glibc's."""
    import ctypes
    import os

    global _FREED_MEMORY_KEPT
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        mallopt = ctypes.CDLL(None).mallopt if glibc.startswith("glibc") else None
    except (ValueError, OSError, AttributeError):
        mallopt = None
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _FREED_MEMORY_KEPT = bool(mallopt and mallopt(m_mmap_threshold, 32 << 20) and
                              mallopt(m_trim_threshold, 2**31 - 1))
    return _FREED_MEMORY_KEPT


def item_seed(*parts) -> int:
    """A stable 63-bit seed from any ints/strings (independent of PYTHONHASHSEED and of workers)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def video_shapes(cfg) -> dict:
    """:class:`VideoDataset`'s shape arguments for an ``MBTConfig``: the rgb, spectrogram and flow shapes
    and the ``(n, d_in)`` of every other modality, read as a feature sequence from its sidecar file."""
    mods = cfg.modality_fusion
    out = {"rgb_shape": cfg.rgb_shape if "rgb" in mods else (32, 224, 224),
           "spectrogram_shape": cfg.spectrogram_shape if "spectrogram" in mods else (800, 128),
           "flow_shape": cfg.input_shape("flow")[1:] if "flow" in mods else None, "feature_shapes": {}}
    for m in mods:
        if m not in BUILTIN_MODALITIES:
            shape = cfg.input_shape(m)
            if len(shape) != 2:
                raise ValueError(f"{m}: a video dataset reads modality {m!r} as a feature sequence [n, d_in] from "
                                 f"'<video stem>.{m}.npy', but its model input is {shape}")
            out["feature_shapes"][m] = shape
    return out


class VideoDataset(Dataset):
    """Video files -> MBT inputs, Scenic's sampling parameterised by the model's input shapes.

    ``rgb_shape``/``spectrogram_shape`` are the config's ``(T, H, W)`` / ``(time, mel)``; ``mode``
    is ``train`` (random clip, augmentation), ``eval`` (centre clip) or ``test`` (``num_clips``
    linspaced clips). Indexing with ``(index, seed)`` (as :class:`ResumableSampler` does) makes every
    random choice a function of that seed; a plain int uses a seed derived from the index.

    Sidecar modalities (module docstring): ``flow_shape`` ``(T, h, w)`` (default ``rgb_shape``; its ``T``
    must be ``rgb_shape``'s when both are read), ``flow_scale`` (pixels mapped to 1), ``flow_root``;
    ``feature_shapes`` ``{m: (n, d_in)}`` for every feature modality, ``features_root``.
    """

    def __init__(self, items, num_classes: int, rgb_shape=(32, 224, 224), spectrogram_shape=(800, 128),
                 multi_label: bool = True, mode: str = "train", num_clips: int = 1,
                 modalities=("spectrogram", "rgb"), spec_mean: float = audio_lib.SCENIC_SPEC_MEAN,
                 spec_std: float = audio_lib.SCENIC_SPEC_STD, spec_augment: bool = True, class_names=None,
                 seek: bool = True, flow_shape=None, flow_scale: float = 20.0, flow_root=None,
                 feature_shapes=None, features_root=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        modalities = tuple(modalities)
        rgb_shape = tuple(rgb_shape)
        flow_shape = rgb_shape if flow_shape is None else tuple(flow_shape)
        feature_shapes = {m: tuple(v) for m, v in (feature_shapes or {}).items()}
        self._check_sidecar_args(modalities, rgb_shape, flow_shape, flow_scale, feature_shapes)
        for path, labels in items:
            bad = [c for c in labels if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"{path}: label(s) {bad} outside [0, {num_classes})")
            if not multi_label and len(labels) != 1:
                raise ValueError(f"{path}: single-label dataset needs exactly one label, got {labels}")
        self.items = list(items)
        self.num_classes, self.multi_label, self.mode = num_classes, multi_label, mode
        self.num_clips = num_clips if mode == "test" else 1
        self.rgb_shape, self.spectrogram_shape = rgb_shape, tuple(spectrogram_shape)
        self.modalities = modalities
        self.flow_shape, self.flow_scale = flow_shape, float(flow_scale)
        self.flow_root = None if flow_root is None else Path(flow_root)
        self.feature_modalities = tuple(m for m in modalities if m not in BUILTIN_MODALITIES)
        self.feature_shapes = {m: feature_shapes[m] for m in self.feature_modalities}
        self.features_root = None if features_root is None else Path(features_root)
        self.spec_mean, self.spec_std, self.spec_augment = spec_mean, spec_std, spec_augment
        self.class_names = class_names
        self.seek = seek            # False: always decode from the start (the seek path's reference)
        # counted in this process (workers count their own copies): items, seek, decode_fallback,
        # "fallback: <why>", frames_substituted, skipped, audio_missing
        self.stats: collections.Counter = collections.Counter()
        self.stage_seconds: dict | None = None  # set to {} to collect seconds per stage (bench data)

    @staticmethod
    def _check_sidecar_args(modalities, rgb_shape, flow_shape, flow_scale, feature_shapes) -> None:
        for m in modalities:
            if not isinstance(m, str) or not m or m in RESERVED_KEYS or m.endswith("_length") \
                    or not all(c.isalnum() or c in "_-" for c in m):
                raise ValueError(f"modalities: {m!r} is not a usable modality name (letters, digits, '_', '-'; "
                                 f"not one of {RESERVED_KEYS} nor ending in '_length')")
        if "flow" in modalities:
            if len(flow_shape) != 3 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in flow_shape):
                raise ValueError(f"flow_shape: expected (T, h, w) positive integers, got {flow_shape}")
            if "rgb" in modalities and flow_shape[0] != rgb_shape[0]:
                raise ValueError(f"flow_shape {flow_shape} and rgb_shape {rgb_shape}: flow is aligned with the rgb "
                                 f"frames, so their T must be equal (got {flow_shape[0]} and {rgb_shape[0]})")
            if not flow_scale > 0:
                raise ValueError(f"flow_scale: expected a positive number of pixels, got {flow_scale}")
        for m in modalities:
            if m in BUILTIN_MODALITIES:
                continue
            if m not in feature_shapes:
                raise ValueError(f"feature_shapes: modality {m!r} is read from '<video stem>.{m}.npy' and needs its "
                                 f"(n, d_in), got feature_shapes for {sorted(feature_shapes)}")
            shape = feature_shapes[m]
            if len(shape) != 2 or not all(isinstance(v, numbers.Integral) and v >= 1 for v in shape):
                raise ValueError(f"feature_shapes[{m!r}]: expected (n, d_in) positive integers, got {shape}")

    @property
    def num_skipped(self) -> int:
        return self.stats["skipped"]

    @property
    def num_audio_missing(self) -> int:
        return self.stats["audio_missing"]

    @classmethod
    def from_csv(cls, csv_path, root=None, **kw):
        return cls(read_csv(csv_path, root), **kw)

    @classmethod
    def from_folder(cls, root, **kw):
        items, classes = read_folder(root)
        kw.setdefault("num_classes", len(classes))
        kw.setdefault("multi_label", False)
        return cls(items, class_names=classes, **kw)

    def __len__(self):
        return len(self.items)

    def _decode(self, index: int, rng: np.random.Generator, want_rgb: bool, want_audio: bool) -> DecodedClips:
        """The clip(s) of item ``index``, every random choice drawn from ``rng`` (PreparedDataset reads a
        prepared cache instead, with the same draws)."""
        want_flow = "flow" in self.modalities
        shape = self.flow_shape if want_flow and not want_rgb else self.rgb_shape  # flow alone: planned for itself
        return read_clips(self.items[index][0], shape[0], shape[1:], self.mode, self.num_clips, rng,
                          want_rgb=want_rgb, want_audio=want_audio, seek=self.seek, stages=self.stage_seconds,
                          want_plan=want_flow)

    def _flow(self, path: Path, flow: np.ndarray, clips: DecodedClips) -> list[torch.Tensor]:
        if clips.source_frames is None:
            raise ValueError(f"{type(self).__name__} cannot give 'flow': its clips do not say which source frames "
                             f"and crop they used (read the videos with VideoDataset)")
        check_flow(flow, path, clips.source_size, clips.num_source_frames)
        crop = self.rgb_shape[1:] if "rgb" in self.modalities else self.flow_shape[1:]
        return [flow_clip(flow, frames, plan, crop, self.flow_shape[1:], self.flow_scale)
                for frames, plan in zip(clips.source_frames, clips.crops)]

    def _skip_sidecar(self, index: int, reason: str) -> dict:
        self.stats["skipped"] += 1
        log.warning("skipping %s; %d skipped so far in this process", reason, self.num_skipped)
        return {"skipped": reason, "index": index, "sidecar": True}

    def _spectrogram(self, clips: DecodedClips, rng_torch) -> list[torch.Tensor]:
        t, mel = self.spectrogram_shape
        start_proportions = clips.start_proportions
        if clips.logmel is not None:  # computed by `mbt-fast prepare` with the same function
            logmel = clips.logmel
        elif clips.waveform is None:
            return [torch.zeros(t, mel) for _ in start_proportions]
        else:
            logmel = audio_lib.log_mel_spectrogram(clips.waveform, audio_lib.SAMPLE_RATE, num_mel=mel)
        spec = audio_lib.normalize_spectrogram(logmel, self.spec_mean, self.spec_std)
        out = []
        for p in start_proportions:
            s = spec[audio_lib.sample_window(spec.shape[0], t, p)]
            if self.mode == "train" and self.spec_augment:
                s = spec_augment_freq(s, generator=rng_torch)
            out.append(s)
        return out

    def __getitem__(self, key):
        if _FREED_MEMORY_KEPT is None and torch.utils.data.get_worker_info() is not None:
            keep_freed_memory()  # a DataLoader worker: reuse the freed clips' memory (see there)
        index, seed = key if isinstance(key, tuple) else (key, item_seed("eval", key))
        path, labels = self.items[index]
        rng = np.random.default_rng(seed)
        rng_torch = torch.Generator().manual_seed(seed)
        want_rgb, want_audio = "rgb" in self.modalities, "spectrogram" in self.modalities
        self.stats["items"] += 1
        try:  # the sidecar files first: a missing one skips the item before any decoding
            flow_path = sidecar_path(path, "flow", self.flow_root) if "flow" in self.modalities else None
            flow = open_flow(flow_path) if flow_path is not None else None
            features = {m: read_features(sidecar_path(path, m, self.features_root), self.feature_shapes[m])
                        for m in self.feature_modalities}
        except SidecarError as e:
            return self._skip_sidecar(index, f"{path}: {e}")
        try:
            clips = self._decode(index, rng, want_rgb, want_audio)
        except Exception as e:  # noqa: BLE001 -- any decoding failure means "skip this file"
            self.stats["skipped"] += 1
            log.warning("skipping unreadable video %s (%s: %s); %d skipped so far in this process",
                        path, type(e).__name__, e, self.num_skipped)
            return {"skipped": f"{path}: {type(e).__name__}: {e}", "index": index}
        if flow is not None:
            try:
                flows = self._flow(flow_path, flow, clips)
            except SidecarError as e:
                return self._skip_sidecar(index, f"{path}: {e}")
        fallback = clips.decode.startswith("full")
        if want_rgb:
            self.stats["decode_fallback" if fallback else clips.decode] += 1  # "seek" or "prepared"
        if fallback and self.seek:
            self.stats[f"fallback: {clips.decode[len('full: '):]}"] += 1
            log.info("%s: decoded from the start (%s)", path, clips.decode)
        if clips.frames_substituted:
            self.stats["frames_substituted"] += clips.frames_substituted
            log.warning("%s: %d wanted frame(s) could not be decoded (truncated file?); nearest decoded frame used",
                        path, clips.frames_substituted)
        no_audio = clips.waveform is None and clips.logmel is None
        item = {"index": index, "audio_missing": want_audio and no_audio,
                "decode_fallback": want_rgb and fallback}
        if want_rgb:
            item["rgb"] = clips.rgb[0] if self.num_clips == 1 else torch.stack(clips.rgb)
        if want_audio:
            if no_audio:
                self.stats["audio_missing"] += 1
                log.warning("%s has no audio track; using a zero spectrogram (%d such files so far in this process)",
                            path, self.num_audio_missing)
            t0 = time.perf_counter()
            specs = self._spectrogram(clips, rng_torch)
            if self.stage_seconds is not None:
                self.stage_seconds["log-mel"] = self.stage_seconds.get("log-mel", 0.0) + time.perf_counter() - t0
            item["spectrogram"] = specs[0] if self.num_clips == 1 else torch.stack(specs)
        if flow is not None:
            item["flow"] = flows[0] if self.num_clips == 1 else torch.stack(flows)
        for m, (x, length) in features.items():
            item[m] = x if self.num_clips == 1 else x.expand(self.num_clips, *x.shape).contiguous()
            item[f"{m}_length"] = length
        label = torch.zeros(self.num_classes)
        label[labels] = 1.0
        item["label"] = label
        return item


def collate_skip_bad(batch: list) -> dict:
    """Stack the good items' tensors (every modality and ``label``) and their ``*_length`` ints (as an
    int64 tensor); drop ``None`` and skipped items, reporting ``num_skipped``, ``num_audio_missing`` and
    ``num_decode_fallback``. A batch with no good item has only those counts (and ``skipped`` reasons)."""
    good = [b for b in batch if b is not None and "skipped" not in b]
    out = {
        "num_skipped": len(batch) - len(good),
        "skipped": [b["skipped"] for b in batch if b is not None and "skipped" in b],
        "num_audio_missing": sum(bool(b.get("audio_missing", False)) for b in good),
        "num_decode_fallback": sum(bool(b.get("decode_fallback", False)) for b in good),
    }
    if not good:
        return out
    for k, v in good[0].items():  # every modality and the label
        if torch.is_tensor(v):
            # default_collate stacks into shared memory in a DataLoader worker, where the batch has to be to reach
            # the training process: a stack in private memory would be copied there once more when sent
            out[k] = default_collate([b[k] for b in good])
        elif k.endswith("_length"):
            out[k] = torch.tensor([b[k] for b in good], dtype=torch.int64)
    out["index"] = torch.tensor([b["index"] for b in good])
    return out
