"""A prepared cache: every video decoded once, ``mbt-fast train --prepared DIR`` reads frames instead of video.

Layout of ``DIR``:

- ``shard-00000.safetensors``, ...: ``clips_per_shard`` consecutive items of the source list each. Per
  item ``i``: ``i.frames`` uint8 ``[n, 3, h, w]`` (the source frames the 25 fps timeline shows, short side
  resized to ``256/224 * crop`` with the loader's own uint8 resize), ``i.ticks`` int32 ``[num_ticks]`` (25 fps
  tick -> row of ``i.frames``), ``i.logmel`` float32 ``[frames, mel]`` (un-normalised log-mel of the whole
  track, absent without audio). The shard's metadata holds its items' records (source path, labels, source
  frame size, why an unreadable file was skipped) and the preparation parameters;
- ``index.json``: the parameters and every record, written last.

Why this form: a safetensors tensor is a contiguous, memory-mapped block, so reading a clip touches only
its 32 frames (``get_slice``), with no decoding and no pickle; records travel inside the shards, so an
interrupted run keeps every finished shard (each written to ``*.tmp`` and renamed) and starts again at the
first missing one. WebDataset-style tar shards are built for streaming from object storage: they are read
front to back, so random access means a shuffle buffer instead of the sampler's permutation, which would
change the sampling and the exact resume; frames in them are usually JPEG, which costs a decode per frame
and changes the pixels. The price here is size: raw uint8 frames, ~0.35 MB per frame at 455x256, ~87 MB
for a 10 s clip.

Sampling is the video path's: the same random draws in the same order (clip offset, scale jitter, crop,
flip; :mod:`mbt_fast.data.video`), planned on the source frame size; only the resize to the jittered size
starts from the stored frames instead of the source (in eval, where no jitter applies, the stored size is
the wanted one and the tensors are identical).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from mbt_fast.data import audio as audio_lib
from mbt_fast.data.dataset import VideoDataset, read_csv, read_folder
from mbt_fast.data.video import (SCENIC_CROP, SCENIC_RESIZE, Box, DecodedClips, _Collector, _decode_from_start,
                                 _index_and_audio, _open, _Stages, assemble_clip, plan_clips, plan_crop,
                                 resize_uint8, resized_size, ticks_to_source_frames)

log = logging.getLogger(__name__)

FORMAT = "mbt_fast.prepared/1"
INDEX_NAME = "index.json"
META_KEY = "mbt_fast_prepared"


class PreparedError(ValueError):
    """A prepared folder is missing, incomplete or was made with other parameters."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def source_items(source, root=None) -> tuple[list[tuple[str, list[int]]], dict]:
    """(items, description) of a CSV file (``path,labels``) or a folder ``DIR/<class>/<clip>``."""
    source = Path(source)
    if source.is_dir():
        items, classes = read_folder(source)
        return items, {"kind": "folder", "path": str(source.resolve()), "class_names": classes}
    if source.is_file():
        return read_csv(source, root), {"kind": "csv", "path": str(source.resolve()), "class_names": None}
    raise PreparedError(f"prepare: {str(source)!r} is neither a CSV file nor a folder")


def prepare_clip(path: str, crop: int, num_mel: int) -> tuple[dict, dict]:
    """Decode ``path`` once: (tensors without the item prefix, record). Raises on unreadable files."""
    clock = _Stages(None)
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if container.streams.audio else None
        index, waveform = _index_and_audio(container, vstream, astream, clock)
        h, w = vstream.codec_context.height, vstream.codec_context.width
    if not (h > 0 and w > 0):
        raise ValueError(f"{path}: the video stream has no frame size ({w}x{h})")
    tick_src = ticks_to_source_frames(index.times)
    size = resized_size(h, w, SCENIC_RESIZE / SCENIC_CROP * crop)  # eval's size for this crop: no resize there
    whole = Box(size, 0, 0, size)  # the whole resized frame: any crop is cut when training reads it
    col = _Collector({int(j) for j in tick_src}, {whole}, clock, pix_fmt="rgb24")
    with _open(path) as container:  # from the start, as the video path's reference decode
        err = _decode_from_start(container, container.streams.video[0], index, col, clock)
    if not col.got:
        raise ValueError(f"{path}: no video frame could be decoded ({err or 'no frame'})")
    keys = np.asarray(sorted(col.got))
    # a frame no decode produced (truncated file): the nearest decoded one, as read_clips does
    rows = np.abs(keys[None, :] - tick_src[:, None]).argmin(1)
    tensors = {"frames": torch.stack([col.frames[(int(k), whole)] for k in keys]),  # RGB planes
               "ticks": torch.from_numpy(rows.astype(np.int32))}
    if waveform is not None and waveform.numel() > 0:
        tensors["logmel"] = audio_lib.log_mel_spectrogram(waveform, audio_lib.SAMPLE_RATE, num_mel=num_mel).contiguous()
    record = {"source_size": [h, w], "size": list(size), "num_ticks": int(len(tick_src)),
              "frames_substituted": int((keys[rows] != tick_src).sum()), "decode_error": err}
    return tensors, record


def _read_shard_records(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if META_KEY not in meta:
        raise PreparedError(f"{path} is not a shard of `mbt-fast prepare` (no {META_KEY!r} metadata)")
    return json.loads(meta[META_KEY])


def prepare(source, out, root=None, crop: int = SCENIC_CROP, num_mel: int = 128, clips_per_shard: int = 16,
            progress: bool = True) -> dict:
    """Decode every file of ``source`` (CSV or folder) once into ``out`` (module docstring); returns the index.

    Resumable: finished shards are kept (after checking they come from the same list and parameters).
    Unreadable files are recorded as skipped (the training loader skips them as the video path does).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if clips_per_shard < 1 or crop < 1 or num_mel < 1:
        raise PreparedError(f"prepare: clips_per_shard, crop and num_mel must be >= 1, got "
                            f"{clips_per_shard}, {crop}, {num_mel}")
    items, desc = source_items(source, root)
    if not items:
        raise PreparedError(f"prepare: {source} lists no video file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()  # a shard an interrupted run was writing
    params = {"format": FORMAT, "crop": crop, "short_side": SCENIC_RESIZE / SCENIC_CROP * crop, "num_mel": num_mel,
              "clips_per_shard": clips_per_shard, "source": desc, "num_items": len(items)}
    n_shards = (len(items) + clips_per_shard - 1) // clips_per_shard
    records: list[dict] = []
    done = [k for k in range(n_shards) if (out / shard_name(k)).exists()]
    bar = tqdm(total=len(items), disable=not progress, desc="prepare", unit="clip", dynamic_ncols=True)
    try:
        for k in range(n_shards):
            lo, hi = k * clips_per_shard, min(len(items), (k + 1) * clips_per_shard)
            path = out / shard_name(k)
            if k in done:
                meta = _read_shard_records(path)
                mine = [(it[0], it[1]) for it in items[lo:hi]]
                theirs = [(r["path"], r["labels"]) for r in meta["items"]]
                if meta["params"] != params or theirs != mine:
                    raise PreparedError(f"prepare: {path} was made from another list or with other parameters "
                                        f"(crop, num_mel, clips_per_shard); choose another --out")
                records += meta["items"]
                bar.update(hi - lo)
                continue
            tensors, shard_records = {}, []
            for i in range(lo, hi):
                file, labels = items[i]
                rec = {"index": i, "path": file, "labels": labels, "shard": shard_name(k), "skipped": None}
                try:
                    t, info = prepare_clip(file, crop, num_mel)
                    tensors.update({f"{i}.{name}": v for name, v in t.items()})
                    rec.update(info)
                    if info["frames_substituted"]:
                        log.warning("prepare: %s: %d frame(s) could not be decoded (truncated file?); the nearest "
                                    "decoded frame stands in", file, info["frames_substituted"])
                except Exception as e:  # noqa: BLE001 -- any decoding failure means "skip this file"
                    rec["skipped"] = f"{type(e).__name__}: {e}"
                    log.warning("prepare: skipping unreadable video %s (%s)", file, rec["skipped"])
                shard_records.append(rec)
                bar.update(1)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps({"params": params, "items": shard_records})})
            os.replace(tmp, path)  # a shard exists only once complete
            records += shard_records
            bar.set_postfix(skipped=sum(r["skipped"] is not None for r in records))
    finally:
        bar.close()
    index = {**params, "num_skipped": sum(r["skipped"] is not None for r in records), "items": records}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX_NAME)
    return index


def read_index(folder) -> dict:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise PreparedError(f"--prepared {folder}: no {INDEX_NAME} (not a prepared folder, or `mbt-fast prepare` "
                            f"did not finish: run it again with the same arguments to complete it)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise PreparedError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


class PreparedDataset(VideoDataset):
    """A :class:`VideoDataset` over a prepared folder: same items, labels, modes and random draws.

    ``num_classes``/``multi_label`` default to the source's: a folder gives its class count, single label;
    a CSV needs ``num_classes`` and is multi-label unless told otherwise.
    """

    def __init__(self, folder, num_classes: int | None = None, multi_label: bool | None = None, **kw):
        if "flow" in kw.get("modalities", ()):
            # the cache stores resized frames, not which source frames and crop a clip used: flow cannot follow
            raise PreparedError(f"--prepared {folder}: a prepared cache has no optical flow; train a model with "
                                f"flow from the videos (--data-dir / --csv) and their .flow.npy files")
        index = read_index(folder)
        src = index["source"]
        if num_classes is None:
            if src["kind"] != "folder":
                raise PreparedError(f"--prepared {folder}: prepared from a CSV ({src['path']}); give --num-classes")
            num_classes = len(src["class_names"])
        if multi_label is None:
            multi_label = src["kind"] != "folder"
        items = [(r["path"], r["labels"]) for r in index["items"]]
        super().__init__(items, num_classes=num_classes, multi_label=multi_label, class_names=src["class_names"], **kw)
        self.folder, self.index = Path(folder), index
        self.records = index["items"]
        crop = min(self.rgb_shape[1:])
        if crop != index["crop"]:
            log.warning("--prepared %s was made for %d-pixel crops, this run crops %d: frames are resized again "
                        "from the stored size", folder, index["crop"], crop)
        if self.spectrogram_shape[1] != index["num_mel"] and "spectrogram" in self.modalities:
            raise PreparedError(f"--prepared {folder} holds {index['num_mel']}-bin log-mels, the model wants "
                                f"{self.spectrogram_shape[1]}: prepare again with --num-mel {self.spectrogram_shape[1]}")
        self._shards: dict = {}  # opened lazily, in each worker process

    def __getstate__(self):  # open shard handles cannot travel to spawned workers
        return {**self.__dict__, "_shards": {}}

    def _shard(self, name: str):
        from safetensors import safe_open

        if name not in self._shards:
            path = self.folder / name
            if not path.is_file():
                raise PreparedError(f"{path}: shard missing (listed in {self.folder / INDEX_NAME})")
            self._shards[name] = safe_open(str(path), framework="pt")
        return self._shards[name]

    def _decode(self, index, rng, want_rgb, want_audio) -> DecodedClips:
        rec = self.records[index]
        if rec["skipped"]:
            raise ValueError(f"unreadable when prepared: {rec['skipped']}")
        f = self._shard(rec["shard"])
        ticks = f.get_tensor(f"{index}.ticks")
        logmel = f.get_tensor(f"{index}.logmel") if want_audio and f"{index}.logmel" in f.keys() else None
        plans = plan_clips(len(ticks), self.rgb_shape[0], self.mode, self.num_clips, rng)
        props = [p.start_proportion for p in plans]
        if not want_rgb:
            return DecodedClips(None, None, props, decode="prepared", logmel=logmel)
        h, w = rec["source_size"]
        crop = self.rgb_shape[1:]
        crops = [plan_crop(h, w, crop, train=(self.mode == "train"), rng=rng) for _ in plans]
        frames = f.get_slice(f"{index}.frames")
        rgb, cache = [], {}
        for p, c in zip(plans, crops):
            clip = []
            for t in p.ticks:
                key = (int(ticks[t]), c.size)
                if key not in cache:  # only the clip's frames are read from the memory-mapped shard
                    x = frames[key[0]:key[0] + 1][0]
                    cache[key] = x if tuple(x.shape[1:]) == c.size else resize_uint8(x.permute(1, 2, 0), c.size)
                clip.append(cache[key])
            rgb.append(assemble_clip(clip, crop, c))
        # frames a truncated file lacked were substituted (and reported) by `mbt-fast prepare`
        return DecodedClips(rgb, None, props, decode="prepared", logmel=logmel)
