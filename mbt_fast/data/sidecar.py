"""Precomputed per-video arrays stored next to the video ("sidecar" ``.npy`` files): optical flow and
feature sequences (:class:`mbt_fast.data.dataset.VideoDataset` documents the formats).

For ``clips/a.mp4`` and modality ``m`` the file is ``clips/a.m.npy`` (``<root>/a.m.npy`` when a root
folder is given). Files are memory-mapped, so a clip reads only the flow fields it uses, and of them
only the window under its crop box (32 fields of a 640x360 video to a 224 crop: ~20-30 ms on one core,
a third of resizing whole fields). Every problem with a file (missing, unreadable, wrong dtype or
shape) raises :class:`SidecarError` naming the file; the dataset turns it into a skipped item.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mbt_fast.data.video import CropPlan


class SidecarError(ValueError):
    """A sidecar file is missing, unreadable or does not fit its video / the expected shape."""


def sidecar_path(video_path, modality: str, root=None) -> Path:
    video_path = Path(video_path)
    return (Path(root) if root is not None else video_path.parent) / f"{video_path.stem}.{modality}.npy"


def open_array(path: Path) -> np.ndarray:
    """The float array in ``path``, memory-mapped (nothing read yet)."""
    if not path.is_file():
        raise SidecarError(f"sidecar file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- any failure to read means "skip this item"
        raise SidecarError(f"sidecar file {path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # e.g. an .npz archive under an .npy name
        raise SidecarError(f"sidecar file {path}: expected one .npy array, got {type(arr).__name__}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise SidecarError(f"sidecar file {path}: expected a float array (float16/float32), got dtype {arr.dtype}")
    return arr


def open_flow(path: Path) -> np.ndarray:
    arr = open_array(path)
    if arr.ndim != 4 or arr.shape[-1] != 2 or arr.shape[0] < 1:
        raise SidecarError(f"flow file {path}: expected shape [frames, H, W, 2] with frames >= 1, "
                           f"got {list(arr.shape)}")
    return arr


def check_flow(flow: np.ndarray, path: Path, source_size: tuple[int, int], num_source_frames: int) -> None:
    """One field per source frame (the last may be absent) at the video's frame size."""
    h, w = source_size
    n = num_source_frames
    if tuple(flow.shape[1:3]) != (h, w) or flow.shape[0] not in (n, n - 1):
        want = f"[{n} or {n - 1}, {h}, {w}, 2]" if n > 1 else f"[{n}, {h}, {w}, 2]"
        raise SidecarError(f"flow file {path}: expected shape {want} (the video's frames, height, width), "
                           f"got {list(flow.shape)}")


def _source_coords(n_in: int, n_out: int, start: int, count: int) -> torch.Tensor:
    """Where outputs ``start .. start + count - 1`` of a bilinear resize ``n_in -> n_out`` sample the input
    (half-pixel centres, clamped to the edges, no antialiasing: the RGB path's resize), float64."""
    s = (torch.arange(start, start + count, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    return s.clamp_(0, n_in - 1)


def _window(s: torch.Tensor, n_in: int) -> tuple[int, int, torch.Tensor]:
    """The input rows (or columns) ``lo .. hi`` that coordinates ``s`` interpolate between, and ``s`` as
    ``grid_sample``'s normalised coordinates in that window (align_corners=False)."""
    lo, hi = int(s[0].floor()), min(int(s[-1].floor()) + 1, n_in - 1)
    return lo, hi, ((2 * (s - lo) + 1) / (hi - lo + 1) - 1).float()


def flow_clip(flow: np.ndarray, frames: np.ndarray, plan: CropPlan, crop: tuple[int, int],
              out_size: tuple[int, int], scale: float) -> torch.Tensor:
    """Flow ``[F, H, W, 2]`` -> float32 ``[2, T, h, w]`` for source ``frames``, placed as the RGB clip.

    Field ``j`` (frame ``j`` -> ``j + 1``) for clip frame ``j``, clamped to the last field. The fields are
    resized to ``plan.size`` and cropped at ``plan``'s box of size ``crop`` (the RGB crop), resized again
    to ``out_size`` when that differs, flipped with the RGB; displacements follow: each axis scaled by its
    resize factor, x negated by a flip. Then divided by ``scale`` (pixels) and clamped to [-1, 1].
    """
    src_h, src_w = flow.shape[1:3]
    (rh, rw), (ch, cw), (oh, ow) = plan.size, crop, out_size
    fields = np.minimum(np.asarray(frames, dtype=np.int64), flow.shape[0] - 1)
    unique, inverse = np.unique(fields, return_inverse=True)  # 25 fps ticks repeat frames: each read once
    # the resize is evaluated inside the crop box only, by sampling the source where the resized pixels
    # fall (the same bilinear weights): only the source window under the box is read from the
    # memory-mapped file and converted, and no full frame is resized
    r_lo, r_hi, gy = _window(_source_coords(src_h, rh, plan.top, ch), src_h)
    c_lo, c_hi, gx = _window(_source_coords(src_w, rw, plan.left, cw), src_w)
    x = np.asarray(flow[unique, r_lo:r_hi + 1, c_lo:c_hi + 1], dtype=np.float32)
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # [U, 2, rows, cols]
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)  # [ch, cw, (x, y)]
    x = F.grid_sample(x, grid.expand(len(unique), ch, cw, 2), mode="bilinear", padding_mode="border",
                      align_corners=False)
    if (oh, ow) != (ch, cw):
        x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=False)
    gain = torch.tensor([rw / src_w * ow / cw, rh / src_h * oh / ch])
    if plan.flip:
        x = x.flip(-1)
        gain[0] = -gain[0]
    x = (x * (gain / scale).view(1, 2, 1, 1)).clamp_(-1.0, 1.0)
    return x[torch.from_numpy(inverse.reshape(-1))].permute(1, 0, 2, 3).contiguous()


def read_features(path: Path, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """``[rows, d_in]`` -> (float32 ``[n, d_in]``: truncated to ``n`` rows or zero-padded to them, the
    number of the file's rows in it, ``min(rows, n)``)."""
    n, d = shape
    arr = open_array(path)
    if arr.ndim != 2 or arr.shape[1] != d:
        raise SidecarError(f"feature file {path}: expected shape [rows, {d}] (feature_shapes gives ({n}, {d})), "
                           f"got {list(arr.shape)}")
    length = min(arr.shape[0], n)
    out = torch.zeros(n, d)
    out[:length] = torch.from_numpy(np.array(arr[:length], dtype=np.float32))  # a copy: the file is mapped read-only
    return out, length
