"""From files to answers: a model file, video files decoded as in evaluation, class names and scores.

Shared by ``mbt-fast predict``, ``embed``, ``explain`` and ``train --init-from``:

* :func:`load_model`: a safetensors file (``mbt-fast convert`` / ``train`` / ``save_pretrained``) or a
  Scenic msgpack checkpoint with its config JSON;
* :func:`decode_clip`: one video file -> the model's inputs, with the evaluation pipeline of training
  (centre clip, or ``num_clips`` linspaced clips as Scenic's test protocol), and which modalities it has;
* :func:`class_names` / :func:`multi_label`: what the scores mean;
* :func:`run_files`: many files decoded in workers and batched through the model, each file's outputs
  averaged over its clips (raw logits, as Scenic's test protocol), a bad file reported, never fatal.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
from importlib import resources
from pathlib import Path

import torch

from mbt_fast.config import MBTConfig
from mbt_fast.data import audio as audio_lib
from mbt_fast.data.dataset import AUDIOSET_NUM_CLASSES, VIDEO_EXTENSIONS, VideoDataset, csv_rows, video_shapes
from mbt_fast.model import MBT

AUDIOSET_LABELS = "audioset_class_labels_indices.csv"  # mbt_fast/data/labels/, see its README


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header (``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_model(path, config=None, backend: str = "torch") -> MBT:
    """An eval-mode ``MBT`` from ``path``: safetensors (config from its metadata, or ``config`` if given)
    or a Scenic/Flax msgpack checkpoint, which needs ``config`` (a JSON path or an ``MBTConfig``)."""
    from mbt_fast.convert import load_scenic_checkpoint

    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{path}: {what}; expected a model file (.safetensors, or a Scenic checkpoint "
                                f"with a config)")
    cfg = MBTConfig.from_json(config) if isinstance(config, (str, Path)) else config
    if is_safetensors(path):
        return MBT.from_pretrained(path, backend=backend, cfg=cfg)
    if cfg is None:
        raise ValueError(f"{path}: not a safetensors file; a Scenic checkpoint needs its config "
                         f"(a JSON file with Scenic's model fields and input_shapes: --config)")
    return load_scenic_checkpoint(path, cfg, backend=backend)


# ---- class names and the kind of score ----------------------------------------------------------

def audioset_names() -> list[str]:
    """AudioSet's 527 display names in the index order of its ``class_labels_indices.csv``."""
    text = resources.files("mbt_fast.data").joinpath("labels", AUDIOSET_LABELS).read_text()
    rows = list(csv.reader(text.splitlines()))[1:]
    return [r[2] for r in rows]


def read_labels_file(path) -> list[str]:
    """One name per line, or ``index,name`` rows (AudioSet's ``index,mid,display_name`` too: the last
    column is the name); a header row is skipped; indices must be 0..N-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--labels {path}: {'is a directory' if path.is_dir() else 'does not exist'}")
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    if rows and len(rows[0]) > 1 and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # a header such as index,mid,display_name
    if not rows:
        raise ValueError(f"--labels {path}: no class names in it")
    if all(len(r) == 1 for r in rows):
        return [r[0].strip() for r in rows]
    try:
        index = [int(r[0]) for r in rows]
    except ValueError:
        raise ValueError(f"--labels {path}: expected one name per line or 'index,name' rows, got {rows[0]!r}") from None
    if index != list(range(len(rows))):
        raise ValueError(f"--labels {path}: indices must be 0..{len(rows) - 1} in order")
    return [r[-1].strip() for r in rows]


def class_names(model: MBT, labels_file=None) -> list[str]:
    """``labels_file`` if given; else the names in the model file's metadata (models trained on a folder
    carry theirs); else AudioSet's for a 527-class model; else ``class 0`` ... (stated as such)."""
    n = model.cfg.num_classes
    if labels_file is not None:
        names = read_labels_file(labels_file)
        if len(names) != n:
            raise ValueError(f"--labels {labels_file}: expected {n} class names (the model's num_classes), "
                             f"got {len(names)}")
        return names
    if model.class_names is not None:
        return list(model.class_names)
    if n == AUDIOSET_NUM_CLASSES:
        return audioset_names()
    return [f"class {i}" for i in range(n)]


def multi_label(model: MBT, override: bool | None = None) -> bool:
    """Whether scores are per-class sigmoids (multi-label) or one softmax: ``override``, else the model
    file's metadata, else multi-label for 527 classes (AudioSet) and single-label otherwise."""
    if override is not None:
        return override
    if model.multi_label is not None:
        return model.multi_label
    return model.cfg.num_classes == AUDIOSET_NUM_CLASSES


# ---- video files -> inputs ---------------------------------------------------------------------

@dataclasses.dataclass
class Clip:
    """One file's inputs: ``inputs[m]`` has a leading clip axis ``K`` (rgb ``[K, 3, T, H, W]`` in
    [-1, 1], spectrogram ``[K, time, mel]``); ``present`` lists the modalities with data, in the model's
    order (a file without an audio track has no spectrogram); ``lengths``: ``[K]`` rows holding data of
    each ragged feature sequence (its sidecar file's length, for the model's ``lengths``)."""

    path: str
    inputs: dict[str, torch.Tensor]
    present: tuple[str, ...]
    audio_missing: bool
    lengths: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def decode_clip(path, cfg: MBTConfig, num_clips: int = 1, spec_mean: float = audio_lib.SCENIC_SPEC_MEAN,
                spec_std: float = audio_lib.SCENIC_SPEC_STD) -> Clip:
    """Decode ``path`` for ``cfg``'s input shapes with the evaluation pipeline of ``mbt-fast train``
    (``spec_mean``/``spec_std``: its log-mel normalisation, default Scenic's). Raises ``ValueError``
    naming the file when it is missing or not a readable video."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a directory' if path.is_dir() else 'does not exist'}")
    if num_clips < 1:
        raise ValueError(f"num_clips: expected an integer >= 1, got {num_clips}")
    mods = cfg.modality_fusion
    ds = VideoDataset([(str(path), [])], num_classes=cfg.num_classes, mode="test" if num_clips > 1 else "eval",
                      num_clips=num_clips, modalities=mods, spec_mean=spec_mean, spec_std=spec_std, **video_shapes(cfg))
    quiet = logging.getLogger("mbt_fast.data")  # its per-file warnings are training's; the caller reports
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        item = ds[0]
    finally:
        quiet.setLevel(level)
    if "skipped" in item:
        why = item["skipped"].split(": ", 1)[-1]
        raise ValueError(f"{path}: {why}" if item.get("sidecar") else f"{path}: not a readable video ({why})")
    inputs = {m: item[m] if num_clips > 1 else item[m].unsqueeze(0) for m in mods}
    lengths = {m: torch.full((num_clips,), item[f"{m}_length"]) for m in mods if f"{m}_length" in item}
    missing = bool(item["audio_missing"])
    if missing:
        del inputs["spectrogram"]  # zeros are not the audio; the model answers from the rest
        if not inputs:
            raise ValueError(f"{path}: no audio track, and this model reads only the spectrogram")
    return Clip(str(path), inputs, tuple(m for m in mods if m in inputs), missing, lengths)


def expand_sources(sources) -> list[str]:
    """Files, folders (their video files, recursively, sorted) and CSVs (their first column: paths,
    relative to the CSV's folder; an optional ``path`` header) -> paths. A source that does not exist is
    kept, so that it is reported with the others."""
    paths = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                raise ValueError(f"{p}: a folder with no video file ({', '.join(VIDEO_EXTENSIONS)})")
            paths += found
        elif p.suffix.lower() == ".csv" and p.is_file():
            paths += [path for _, path, _ in csv_rows(p)]
        else:
            paths.append(str(p))
    return paths


# ---- many files: decoded in workers, batched through the model ---------------------------------

class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, cfg, num_clips, decode_kw):
        self.paths, self.cfg, self.num_clips, self.decode_kw = paths, cfg, num_clips, decode_kw

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return decode_clip(self.paths[i], self.cfg, self.num_clips, **self.decode_kw)
        except (ValueError, OSError) as e:
            return self.paths[i], str(e)  # reported for this file; the others go on


def _as_list(batch):
    return batch


@torch.no_grad()
def run_files(model: MBT, paths: list[str], fn, num_clips: int = 1, batch_size: int = 8, num_workers: int = 0,
              progress: bool = True, **decode_kw):
    """Yield ``(path, clip, outputs, error)`` per file, in order. ``fn(model, inputs)`` maps a batch of
    clips (``{modality: [n, ...]}``, the modalities present, and ``lengths`` for ragged ones) to
    ``{name: [n, ...]}``; each file's outputs
    are the mean over its clips. Files are decoded in ``num_workers`` processes; files that share their
    modalities run through the model together, ``batch_size`` files at a time. A file that cannot be read
    gives ``error`` (a message naming it) and never stops the others. ``decode_kw``: for ``decode_clip``."""
    from tqdm import tqdm

    device, dtype = model.head.weight.device, model.head.weight.dtype
    loader = torch.utils.data.DataLoader(_Files(paths, model.cfg, num_clips, decode_kw), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_as_list)
    bar = tqdm(total=len(paths), unit="file", disable=not progress or len(paths) < 2, leave=False)
    for batch in loader:
        results = {}
        clips = [c for c in batch if isinstance(c, Clip)]
        for present in dict.fromkeys(c.present for c in clips):  # one model call per set of modalities
            group = [c for c in clips if c.present == present]
            inputs = {m: torch.cat([c.inputs[m] for c in group]).to(device, dtype) for m in present}
            ragged = [m for m in present if m in group[0].lengths]
            if ragged:
                inputs["lengths"] = {m: torch.cat([c.lengths[m] for c in group]).to(device) for m in ragged}
            out = fn(model, inputs)
            counts = [next(iter(c.inputs.values())).shape[0] for c in group]
            for c, parts in zip(group, zip(*(torch.split(v.float().cpu(), counts) for v in out.values()))):
                results[id(c)] = {k: v.mean(0) for k, v in zip(out, parts)}
        for c in batch:
            if isinstance(c, Clip):
                yield c.path, c, results[id(c)], None
            else:
                yield c[0], None, None, c[1]
            bar.update(1)
    bar.close()


def logits_fn(model: MBT, inputs: dict) -> dict:
    """``run_files``'s ``fn`` for predictions: raw logits (averaged over clips, as Scenic's test)."""
    return {"logits": model(**inputs, missing="drop")}


def scores(logits: torch.Tensor, is_multi_label: bool) -> torch.Tensor:
    return logits.sigmoid() if is_multi_label else logits.softmax(-1)


def top_k(values: torch.Tensor, names: list[str], k: int) -> list[dict]:
    v, i = values.topk(min(k, values.numel()))
    return [{"index": int(j), "name": names[int(j)], "score": float(s)} for s, j in zip(v, i)]
