"""Decoding audio-visual clips with PyAV and turning them into MBT inputs (Scenic/DMVR semantics).

Why PyAV: its wheels bundle FFmpeg's libraries (libavformat/libavcodec/libswresample/libswscale), so
`pip install av` is all it takes -- no system ffmpeg binary, no subprocess pipes -- and one opened
container gives both the video frames and the audio track, already resampled to 16 kHz mono by
libswresample, with the timestamps needed to keep them in sync.

RGB as Scenic: frames resampled to 25 fps by timestamp (each 25 fps tick takes the latest source frame
shown at that time), ``T`` frames at stride 2, short side resized to ``256/224 * crop`` (bilinear,
half-pixel centres like ``tf.image.resize``), then train: scale jitter [0.9, 1.33] + random crop +
random horizontal flip; eval: centre crop. Values ``x * 2/255 - 1`` in [-1, 1]. Layout ``[3, T, H, W]``.
Not implemented: DMVR's colour augmentation (brightness/saturation/contrast/hue, grayscale drop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mbt_fast.data.audio import SAMPLE_RATE

VIDEO_FPS = 25.0
FRAME_STRIDE = 2
SCENIC_RESIZE, SCENIC_CROP = 256, 224
SCALE_JITTER = (0.9, 1.33)


@dataclass
class ClipPlan:
    """Which 25 fps ticks a clip uses and where its synced spectrogram window starts."""
    ticks: np.ndarray          # [T] indices into the 25 fps timeline (wrapped when the video is short)
    start_proportion: float    # rgb offset / timeline length, reused for the spectrogram start


def clip_offsets(num_ticks: int, span: int, mode: str, num_clips: int, rng: np.random.Generator | None) -> list[int]:
    """Start ticks of the clips: train random, eval centre, test ``num_clips`` linspaced (Scenic)."""
    max_offset = max(0, num_ticks - span)
    if mode == "train":
        return [int(rng.integers(0, max_offset + 1))]
    if num_clips <= 1:
        return [max_offset // 2]
    return [int(round(o)) for o in np.linspace(0, max_offset, num_clips)]


def plan_clips(num_ticks: int, num_frames: int, mode: str, num_clips: int = 1,
               rng: np.random.Generator | None = None, stride: int = FRAME_STRIDE) -> list[ClipPlan]:
    span = (num_frames - 1) * stride + 1
    plans = []
    for off in clip_offsets(num_ticks, span, mode, num_clips, rng):
        ticks = (off + np.arange(num_frames) * stride) % max(num_ticks, 1)  # repeat short videos
        plans.append(ClipPlan(ticks=ticks, start_proportion=off / max(num_ticks, 1)))
    return plans


def _video_frame_times(container, stream) -> np.ndarray:
    """Presentation times (s) of every frame of ``stream``, from the packets (no decoding)."""
    tb = float(stream.time_base)
    pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
    return np.sort(np.asarray(pts, dtype=np.float64) * tb)


def ticks_to_source_frames(frame_times: np.ndarray, fps: float = VIDEO_FPS) -> np.ndarray:
    """For each tick of a ``fps`` timeline spanning the video, the index of the source frame on show."""
    if len(frame_times) == 0:
        raise ValueError("the video stream has no frames")
    t0, t1 = frame_times[0], frame_times[-1]
    last_dur = (frame_times[-1] - frame_times[-2]) if len(frame_times) > 1 else 1.0 / fps
    num_ticks = max(1, int(math.floor((t1 + last_dur - t0) * fps + 1e-6)))
    tick_times = t0 + np.arange(num_ticks) / fps
    return np.searchsorted(frame_times, tick_times + 1e-6, side="right") - 1


def _decode(container, vstream, astream, frame_times: np.ndarray | None, wanted: set[int]):
    """One demux/decode pass over the wanted streams: RGB arrays of the wanted video frames (matched to
    ``frame_times`` by timestamp) and the audio track as 16 kHz mono float32 (libswresample does the
    mixing down and resampling)."""
    import av

    frames: dict[int, np.ndarray] = {}
    chunks: list[np.ndarray] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE) if astream is not None else None
    streams = [s for s in (vstream if wanted else None, astream) if s is not None]
    for packet in container.demux(*streams):
        for frame in packet.decode():
            if packet.stream.type == "video":
                t = frame.time if frame.time is not None else -1.0
                j = int(np.abs(frame_times - t).argmin())
                if j in wanted and j not in frames:
                    frames[j] = frame.to_ndarray(format="rgb24")
            else:
                frame.pts = None  # the resampler should not try to fill timestamp gaps
                chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
    if resampler is not None:
        chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))  # flush
    waveform = torch.from_numpy(np.concatenate(chunks).astype(np.float32)) if chunks else None
    return frames, waveform


def resize_short_side(frames: torch.Tensor, short: int | float) -> torch.Tensor:
    """``[T, 3, H, W]`` float -> bilinear resize so that min(H, W) == round(short)."""
    h, w = frames.shape[-2:]
    scale = short / min(h, w)
    size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    if size == (h, w):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=False)


def transform_frames(frames: np.ndarray, crop: tuple[int, int], train: bool,
                     rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[3, T, crop_h, crop_w]`` in [-1, 1] (module docstring)."""
    ch, cw = crop
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    short = SCENIC_RESIZE / SCENIC_CROP * min(ch, cw)
    if train:
        short *= rng.uniform(*SCALE_JITTER)
    x = resize_short_side(x, max(short, ch, cw))
    h, w = x.shape[-2:]
    if train:
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    else:
        top, left = (h - ch) // 2, (w - cw) // 2
    x = x[:, :, top:top + ch, left:left + cw]
    if train and rng.random() < 0.5:
        x = x.flip(-1)
    x = x.clamp(0, 255) * (2.0 / 255.0) - 1.0
    return x.permute(1, 0, 2, 3).contiguous()


@dataclass
class DecodedClips:
    rgb: list[torch.Tensor] | None          # per clip [3, T, H, W]
    waveform: torch.Tensor | None           # 16 kHz mono, None when the file has no audio track
    start_proportions: list[float]


def read_clips(path: str, num_frames: int, crop: tuple[int, int], mode: str, num_clips: int = 1,
               rng: np.random.Generator | None = None, want_rgb: bool = True, want_audio: bool = True) -> DecodedClips:
    """Open ``path`` once and return the sampled RGB clip(s) and the whole audio track.

    Raises on unreadable files (the dataset turns that into a skipped example).
    """
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        frame_times = _video_frame_times(container, container.streams.video[0])
    tick_src = ticks_to_source_frames(frame_times)
    plans = plan_clips(len(tick_src), num_frames, mode, num_clips, rng)
    wanted = {int(tick_src[t]) for p in plans for t in p.ticks} if want_rgb else set()
    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        vstream.thread_type = "AUTO"
        astream = container.streams.audio[0] if (want_audio and container.streams.audio) else None
        decoded, waveform = _decode(container, vstream, astream, frame_times, wanted)
    rgb = None
    if want_rgb:
        if not decoded:
            raise ValueError(f"{path}: no video frame could be decoded")
        keys = np.asarray(sorted(decoded))
        rgb = []
        for p in plans:
            # a frame missing from decoding (truncated file) falls back to the nearest decoded one
            idx = [int(keys[np.abs(keys - tick_src[t]).argmin()]) for t in p.ticks]
            frames = np.stack([decoded[i] for i in idx])
            rgb.append(transform_frames(frames, crop, train=(mode == "train"), rng=rng))
    if waveform is not None and waveform.numel() == 0:
        waveform = None
    return DecodedClips(rgb=rgb, waveform=waveform, start_proportions=[p.start_proportion for p in plans])
