"""Decoding audio-visual clips with PyAV and turning them into MBT inputs (Scenic/DMVR semantics).

Why PyAV: its wheels bundle FFmpeg's libraries (libavformat/libavcodec/libswresample/libswscale), so
`pip install av` is all it takes -- no system ffmpeg binary, no subprocess pipes -- and one opened
container gives both the video frames and the audio track, already resampled to 16 kHz mono by
libswresample, with the timestamps needed to keep them in sync.

RGB as Scenic: frames resampled to 25 fps by timestamp (each 25 fps tick takes the latest source frame
shown at that time), ``T`` frames at stride 2, short side resized to ``256/224 * crop`` (bilinear,
half-pixel centres, no antialiasing, like ``tf.image.resize``), then train: scale jitter [0.9, 1.33] +
random crop + random horizontal flip; eval: centre crop. Values ``x * 2/255 - 1`` in [-1, 1]. Layout
``[3, T, H, W]``. Not implemented: DMVR's colour augmentation (brightness/saturation/contrast/hue,
grayscale drop).

Only what a clip needs is decoded (the loader's time is mostly video decoding):

1. one demux pass, no video decoding: every video packet's pts and keyframe flag (the *index*), and the
   audio track, decoded and resampled in blocks (the spectrogram window is placed by the track's full
   length);
2. the clip(s) are planned on the index (25 fps tick -> source frame), every random draw is made
   (clip offset, scale jitter, crop, flip, in that order), so the wanted frames and their crop are known;
3. ``container.seek`` to the last keyframe at or before the first wanted frame, decode until the last
   wanted one and stop. Each decoded frame is matched to the index by its exact pts. Wanted frames are
   converted to RGBA at source size (libswscale), and of the resized frame only the crop is computed
   (:func:`resize_crop_uint8`: bit for bit the crop of the whole resize), in uint8; the clip becomes
   float once, at the end, as ``[3, T, crop_h, crop_w]``.

Never a wrong frame: the seek is trusted only if the decoded pts prove it -- the first decoded frame is
at or before the first wanted one, every decoded pts is in the index, and every wanted pts shows up.
Otherwise (seek raised, landed late, a decoder error, a frame without or with an unknown pts) the file is
decoded again from the start, reopened, and :attr:`DecodedClips.decode` says why (the dataset counts
it). Files whose packets lack timestamps or repeat them (raw elementary streams, some AVI) never seek:
their frame ``k`` is the decoder's ``k``-th output, shown at ``k / frame rate`` (pts order when the pts
repeat). A wanted frame that no decode produces (a truncated file) is replaced by the nearest decoded
one, counted in :attr:`DecodedClips.frames_substituted`.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass
class CropPlan:
    """Where a clip's frames go: resized to ``size`` (h, w), cropped at ``(top, left)``, maybe flipped."""
    size: tuple[int, int]
    top: int
    left: int
    flip: bool


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


def resized_size(h: int, w: int, short: float) -> tuple[int, int]:
    """(h, w) scaled so that min(h, w) == round(short)."""
    scale = short / min(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def plan_crop(h: int, w: int, crop: tuple[int, int], train: bool, rng: np.random.Generator | None = None) -> CropPlan:
    """Scenic's resize/crop/flip choices for a ``h x w`` source (draws jitter, top, left, flip in that order)."""
    ch, cw = crop
    short = SCENIC_RESIZE / SCENIC_CROP * min(ch, cw)
    if train:
        short *= rng.uniform(*SCALE_JITTER)
    rh, rw = resized_size(h, w, max(short, ch, cw))
    if train:
        top, left = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
    else:
        top, left = (rh - ch) // 2, (rw - cw) // 2
    flip = bool(train and rng.random() < 0.5)
    return CropPlan(size=(rh, rw), top=top, left=left, flip=flip)


def resize_uint8(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[H, W, C]`` -> uint8 ``[C, h, w]``, bilinear with half-pixel centres and no antialiasing
    (``tf.image.resize``'s bilinear; torch's uint8 kernel rounds to within 1 level of the float one).

    The result is a ``[C, h, w]`` view of channels-last ``[h, w, C]`` memory when ``rgb`` is contiguous:
    ``rgb[None]`` has the strides torch takes for channels-last, so its uint8 kernel reads and writes the
    pixels as they are instead of writing planes at the end (``rgb.permute(2, 0, 1)[None]`` is taken for
    planar: the same values, ~1.5x the time)."""
    x = rgb[None].permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return x[0]


class Box(NamedTuple):
    """A crop of a resized frame: the frame resized to ``size`` (h, w), then ``crop`` (h, w) cut at (top, left)."""
    size: tuple[int, int]
    top: int
    left: int
    crop: tuple[int, int]


def crop_box(plan: CropPlan, crop: tuple[int, int]) -> Box:
    return Box(tuple(plan.size), plan.top, plan.left, tuple(crop))


def _rows_read(n_in: int, n_out: int, lo: int, hi: int) -> tuple[int, int]:
    """The input rows ``[a, b)`` that outputs ``lo .. hi - 1`` of a bilinear resize ``n_in -> n_out`` read:
    output ``i`` reads rows ``floor(c)`` and ``floor(c) + 1``, ``c = (i + 0.5) * n_in / n_out - 0.5``, clamped
    (torch's indices); one row of margin on each side against rounding of ``c``."""
    s = n_in / n_out
    return max(0, math.floor((lo + 0.5) * s - 0.5) - 1), min(n_in, math.floor((hi - 0.5) * s - 0.5) + 3)


@functools.cache
def _crop_resize_is_exact() -> bool:
    """Whether :func:`resize_crop_uint8`'s two passes give this torch's full resize bit for bit (checked once per
    process on small random images, up- and downscaling): it relies on the kernel resizing the width first and
    rounding to uint8 before the height, as torch's CPU kernel does; other kernels get the full resize."""
    g = torch.Generator().manual_seed(0)
    for (h, w), size, box in (((37, 53), (23, 31), (3, 5, 17, 19)), ((9, 12), (29, 41), (6, 9, 20, 25))):
        for c in (3, 4):
            rgb = torch.randint(0, 256, (h, w, c), dtype=torch.uint8, generator=g)
            top, left, ch, cw = box
            want = resize_uint8(rgb, size)[:, top:top + ch, left:left + cw]
            if not torch.equal(_resize_crop_passes(rgb, size, top, left, (ch, cw)), want):
                return False
    return True


def _resize_crop_passes(rgb: torch.Tensor, size, top: int, left: int, crop) -> torch.Tensor:
    (h, w), (ch, cw) = size, crop
    a, b = _rows_read(rgb.shape[0], h, top, top + ch)
    band = resize_uint8(rgb[a:b], (b - a, w))[:, :, left:left + cw]  # width pass, rows the crop reads
    buf = rgb.new_zeros(rgb.shape[0], cw, rgb.shape[2])  # rows no kept output reads stay 0
    buf[a:b] = band.permute(1, 2, 0)
    return resize_uint8(buf, (h, cw))[:, top:top + ch]  # height pass, the crop's columns


def resize_crop_uint8(rgb: torch.Tensor, box: Box) -> torch.Tensor:
    """``resize_uint8(rgb, box.size)`` cropped to ``box``, bit for bit, at about the cost of the crop.

    torch's uint8 bilinear resizes the width, rounds to uint8, then resizes the height, and an output pixel
    reads a 2x2 source neighbourhood. Rows are independent in the width pass and columns in the height pass,
    so the width pass runs on the source rows the crop reads only, keeping the crop's columns, and the height
    pass on those columns only (from a full-height buffer whose other rows are zero and read by no kept
    output). Each pass keeps the full lengths of the axis it resizes, so its weights are the full resize's.
    (A resize of the cropped source would sample at other positions: torch's resize has no offset.)
    """
    (h, w), (ch, cw), (top, left) = box.size, box.crop, (box.top, box.left)
    if not (0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0):
        raise ValueError(f"crop {box.crop} at ({top}, {left}) does not fit in the resized frame {box.size}")
    if (ch, cw) == (h, w) or not _crop_resize_is_exact():
        return resize_uint8(rgb, box.size)[:, top:top + ch, left:left + cw]
    return _resize_crop_passes(rgb, box.size, top, left, box.crop)


def clip_from_crops(crops: list[torch.Tensor], flip: bool) -> torch.Tensor:
    """uint8 ``[C, h, w]`` crops (``C >= 3``; channels past the third, e.g. alpha, are dropped) -> float
    ``[3, T, h, w]`` in [-1, 1], flipped in uint8 and converted to float once (``x * 2/255 - 1``).

    Channels-last crops (the video path) are stacked as whole pixels, flipped as int32s when a pixel is 4
    bytes, and split into planes while converting; planar ones (the prepared cache) are stacked as planes."""
    if crops[0].stride(0) == 1:
        x = torch.stack([c.permute(1, 2, 0) for c in crops])  # [T, h, w, C]
        if flip:
            x = x.view(torch.int32).flip(2).view(torch.uint8) if x.shape[-1] == 4 else x.flip(2)
        out = torch.empty(3, *x.shape[:3])
        for c in range(3):
            out[c].copy_(x[..., c])
    else:
        x = torch.stack([c[:3] for c in crops], dim=1)
        out = (x.flip(-1) if flip else x).to(torch.float32)
    return out.mul_(2.0 / 255.0).sub_(1.0)


def assemble_clip(frames: list[torch.Tensor], crop: tuple[int, int], plan: CropPlan) -> torch.Tensor:
    """Resized uint8 ``[C, h, w]`` frames -> float ``[3, T, crop_h, crop_w]`` in [-1, 1], cropped and flipped
    per ``plan`` (:func:`clip_from_crops`)."""
    ch, cw = crop
    return clip_from_crops([f[:, plan.top:plan.top + ch, plan.left:plan.left + cw] for f in frames], plan.flip)


def ticks_to_source_frames(frame_times: np.ndarray, fps: float = VIDEO_FPS) -> np.ndarray:
    """For each tick of a ``fps`` timeline spanning the video, the index of the source frame on show."""
    if len(frame_times) == 0:
        raise ValueError("the video stream has no frames")
    t0, t1 = frame_times[0], frame_times[-1]
    last_dur = (frame_times[-1] - frame_times[-2]) if len(frame_times) > 1 else 1.0 / fps
    num_ticks = max(1, int(math.floor((t1 + last_dur - t0) * fps + 1e-6)))
    tick_times = t0 + np.arange(num_ticks) / fps
    return np.searchsorted(frame_times, tick_times + 1e-6, side="right") - 1


@dataclass
class VideoIndex:
    """Every frame of the video stream, from its packets (no decoding), in presentation order."""
    times: np.ndarray          # [N] seconds
    pts: np.ndarray | None     # [N] int64 sorted unique pts (stream time base); None: match frames by order
    keyframe: np.ndarray       # [N] bool
    problem: str | None        # why this file cannot be seeked (None: it can)


def build_index(packets: list[tuple[int | None, bool]], time_base: float, rate: float) -> VideoIndex:
    """``packets``: (pts, is_keyframe) of every non-empty video packet, in file order."""
    n = len(packets)
    if n == 0:
        raise ValueError("the video stream has no frames")
    if any(p is None for p, _ in packets):
        return VideoIndex(np.arange(n) / rate, None, np.zeros(n, dtype=bool), "video packets without timestamps")
    pts = np.asarray([p for p, _ in packets], dtype=np.int64)
    order = np.argsort(pts, kind="stable")
    pts, key = pts[order], np.asarray([k for _, k in packets], dtype=bool)[order]
    if np.any(np.diff(pts) == 0):
        return VideoIndex(pts * time_base, None, key, "repeated video timestamps")
    return VideoIndex(pts * time_base, pts, key, None)


class _Stages:
    """Adds the wall time since the last lap to ``out[stage]`` (the benchmark's breakdown); off when None."""

    def __init__(self, out: dict | None):
        self.out, self.t = out, time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.out is not None:
            now = time.perf_counter()
            self.out[stage] = self.out.get(stage, 0.0) + now - self.t
            self.t = now


def _seek(container, stream, pts: int) -> None:
    """Backward seek to the keyframe at or before ``pts`` (a function so tests can make it fail)."""
    container.seek(pts, stream=stream, backward=True, any_frame=False)


def _open(path):
    import av

    container = av.open(str(path))
    if container.streams.video:
        # one decoding thread: a DataLoader worker is one core (DESIGN §10), and threads only delay output
        ctx = container.streams.video[0].codec_context
        ctx.thread_type, ctx.thread_count = "NONE", 1
    return container


AUDIO_BLOCK = 1 << 16  # decoded audio samples handed to the resampler at once


class _Resampled:
    """Decoded audio frames -> 16 kHz mono float32 (libswresample, through PyAV's resampler, mixes down and
    resamples). The frames are gathered in an ``AudioFifo`` and go to the resampler in blocks of
    ``AUDIO_BLOCK`` samples rather than one by one: it streams, so the output is the same sample for sample
    (tested), and each call costs ~20 us of Python whatever its length (10 s of AAC is ~470 frames). Blocks
    keep memory bounded on long tracks."""

    def __init__(self):
        import av

        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.fifo = av.AudioFifo()
        self.kind = None  # the first frame's sample format, layout and rate
        self.chunks: list[np.ndarray] = []

    def add(self, frame) -> None:
        kind = (frame.format.name, frame.layout.name, frame.sample_rate)
        self.kind = self.kind or kind
        if kind != self.kind:  # the resampler refuses it too; the FIFO would take another layout's samples
            raise ValueError(f"audio frame {kind} does not match the track's first frame {self.kind}")
        frame.pts = None  # no timestamp checks in the FIFO, no gap filling in the resampler
        self.fifo.write(frame)
        if self.fifo.samples >= AUDIO_BLOCK:
            self._resample(self.fifo.read())

    def _resample(self, frame) -> None:  # None: flush the filter's tail
        if frame is not None:
            frame.pts = None
        self.chunks.extend(r.to_ndarray().reshape(-1) for r in self.resampler.resample(frame))

    def finish(self) -> torch.Tensor | None:
        if self.fifo.samples:
            self._resample(self.fifo.read())
        self._resample(None)
        return torch.from_numpy(np.concatenate(self.chunks).astype(np.float32, copy=False)) if self.chunks else None


def _index_and_audio(container, vstream, astream, stages: _Stages):
    """The demux pass: the video index and the whole audio track as 16 kHz mono float32 (:class:`_Resampled`).
    Undecodable audio packets are skipped."""
    import av

    packets: list[tuple[int | None, bool]] = []
    audio = _Resampled() if astream is not None else None
    for packet in container.demux(*[s for s in (vstream, astream) if s is not None]):
        stages.lap("demux/seek")
        if packet.stream.type == "video":
            if packet.size > 0:
                packets.append((packet.pts, bool(packet.is_keyframe)))
            continue
        try:
            frames = packet.decode()
        except av.FFmpegError:
            frames = []  # a damaged audio packet: its samples are lost, the rest of the track is kept
        for frame in frames:
            audio.add(frame)
        stages.lap("audio")
    waveform = None
    if audio is not None:
        waveform = audio.finish()
        stages.lap("audio")
    # only used without pts: the stream's declared rate (raw H.264 carries it in its SPS; FFmpeg's
    # average_rate is a 25 fps placeholder there)
    rate = float(vstream.guessed_rate or vstream.average_rate or VIDEO_FPS)
    index = build_index(packets, float(vstream.time_base), rate)
    return index, waveform


class _Collector:
    """Receives decoded frames: keeps the wanted ones, RGB(A) at source size -> each box's uint8 crop.

    ``pix_fmt``: ``rgba`` (the default) gives the same RGB values as ``rgb24`` (tested), and whole 4-byte
    pixels resize and flip faster; ``rgb24`` (the prepared cache, which keeps every frame of a file until it
    is written) takes a quarter less memory."""

    def __init__(self, wanted: set[int], boxes: set[Box], stages: _Stages, pix_fmt: str = "rgba"):
        from av.video.reformatter import VideoReformatter

        self.wanted, self.boxes, self.stages, self.pix_fmt = wanted, boxes, stages, pix_fmt
        self.frames: dict[tuple[int, Box], torch.Tensor] = {}
        self.got: set[int] = set()
        self.num_decoded = 0  # every frame the decoder produced, wanted or not
        self.reformatter = VideoReformatter()  # one swscale context reused for every frame

    def add(self, j: int, frame) -> None:
        self.num_decoded += 1
        if j in self.wanted and j not in self.got:
            rgb = torch.from_numpy(self.reformatter.reformat(frame, format=self.pix_fmt, threads=1).to_ndarray())
            for box in self.boxes:
                self.frames[(j, box)] = resize_crop_uint8(rgb, box)
            self.got.add(j)
        self.stages.lap("resize/crop")

    def done(self) -> bool:
        return len(self.got) == len(self.wanted)


def _decode_after_seek(container, vstream, index: VideoIndex, col: _Collector, stages: _Stages) -> str | None:
    """Seek path; returns None when every wanted frame was decoded and proven by its pts, else why not."""
    import av

    first, last = min(col.wanted), max(col.wanted)
    keys = np.flatnonzero(index.keyframe[:first + 1])
    start = int(keys[-1]) if len(keys) else 0  # no keyframe flag before it: start at the first frame
    try:
        _seek(container, vstream, int(index.pts[start]))
    except av.FFmpegError as e:
        return f"seek failed ({type(e).__name__})"
    stages.lap("demux/seek")
    first_out = True
    wanted_pts = {int(index.pts[j]) for j in col.wanted}
    ctx = vstream.codec_context
    try:
        for packet in container.demux(vstream):
            stages.lap("demux/seek")
            # a frame no other frame references and the clip does not want need not be decoded at all
            ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted_pts else "NONREF"
            frames = packet.decode()
            stages.lap("decode")
            for frame in frames:
                j = int(np.searchsorted(index.pts, frame.pts)) if frame.pts is not None else -1
                if not 0 <= j < len(index.pts) or index.pts[j] != frame.pts:
                    return "decoded frame without a timestamp of the index"
                if first_out and j > first:
                    return "seek landed after the clip's first frame"
                first_out = False
                col.add(j, frame)
                if j >= last:  # frames come out in pts order: nothing wanted is left
                    return None if col.done() else "wanted frames missing after the seek"
    except av.FFmpegError as e:
        return f"decoding after the seek failed ({type(e).__name__})"
    return None if col.done() else "wanted frames missing after the seek"


def _decode_from_start(container, vstream, index: VideoIndex, col: _Collector, stages: _Stages) -> str | None:
    """Full decode (stopping once every wanted frame is in); frames matched by pts, or by output order
    when the index has no usable pts. A decoder error ends decoding (a truncated file); returns it."""
    import av

    n = 0
    try:
        for packet in container.demux(vstream):
            stages.lap("demux/seek")
            frames = packet.decode()
            stages.lap("decode")
            for frame in frames:
                if index.pts is None:
                    j = n
                elif frame.pts is not None:
                    j = int(np.searchsorted(index.pts, frame.pts))
                    j = j if j < len(index.pts) and index.pts[j] == frame.pts else -1
                else:
                    j = -1  # a frame without a pts in a file with pts: it cannot be placed safely
                n += 1
                col.add(j, frame)
                if col.done():
                    return None
    except av.FFmpegError as e:
        return f"{type(e).__name__} while decoding"
    return None


@dataclass
class DecodedClips:
    rgb: list[torch.Tensor] | None          # per clip [3, T, H, W]
    waveform: torch.Tensor | None           # 16 kHz mono, None when the file has no audio track
    start_proportions: list[float]
    decode: str = "none"                    # "seek", or "full: <why the seek path was not used>"
    frames_substituted: int = 0             # wanted frames no decode produced, replaced by the nearest
    frames_decoded: int = 0                 # video frames decoded (the last pass, when a seek fell back)
    logmel: torch.Tensor | None = None      # un-normalised log-mel of the whole track (prepared cache only)
    # what the clips were made of, for modalities aligned with the RGB (optical flow); None from the prepared cache
    source_frames: list[np.ndarray] | None = None  # per clip [T] source frame index of each clip frame
    crops: list[CropPlan] | None = None     # per clip its resize/crop/flip
    source_size: tuple[int, int] | None = None  # (h, w) of the source frames
    num_source_frames: int = 0              # frames of the video stream (its index)


def read_clips(path: str, num_frames: int, crop: tuple[int, int], mode: str, num_clips: int = 1,
               rng: np.random.Generator | None = None, want_rgb: bool = True, want_audio: bool = True,
               seek: bool = True, stages: dict | None = None, want_plan: bool = False) -> DecodedClips:
    """Open ``path`` and return the sampled RGB clip(s) and the whole audio track (module docstring).

    ``seek=False`` always decodes from the start (the reference the seek path is tested against);
    ``stages``: a dict that receives seconds per stage; ``want_plan`` with ``want_rgb=False``: still draw
    the crops and name the source frames (``source_frames``, ``crops``, ``source_size``), decoding no
    frame -- for optical flow without RGB. Raises on unreadable files (the dataset turns that into a
    skipped example).
    """
    clock = _Stages(stages)
    container = _open(path)
    try:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if (want_audio and container.streams.audio) else None
        index, waveform = _index_and_audio(container, vstream, astream, clock)
        tick_src = ticks_to_source_frames(index.times)
        plans = plan_clips(len(tick_src), num_frames, mode, num_clips, rng)
        if not (want_rgb or want_plan):
            return DecodedClips(None, _nonempty(waveform), [p.start_proportion for p in plans])
        h, w = vstream.codec_context.height, vstream.codec_context.width
        if not (h > 0 and w > 0):
            raise ValueError(f"{path}: the video stream has no frame size ({w}x{h})")
        crops = [plan_crop(h, w, crop, train=(mode == "train"), rng=rng) for _ in plans]
        if not want_rgb:  # the plan only: the frames the clips would show, none decoded
            return DecodedClips(None, _nonempty(waveform), [p.start_proportion for p in plans],
                                source_frames=[tick_src[p.ticks].astype(np.int64) for p in plans], crops=crops,
                                source_size=(h, w), num_source_frames=len(index.times))
        wanted = {int(tick_src[t]) for p in plans for t in p.ticks}
        boxes = [crop_box(c, crop) for c in crops]
        col = _Collector(wanted, set(boxes), clock)
        why = index.problem or (None if seek else "seek=False")
        if why is None:
            why = _decode_after_seek(container, vstream, index, col, clock)
    finally:
        container.close()
    decode = "seek"
    if why is not None:  # decode again from the start, in a fresh container: never trust a failed seek
        decode = f"full: {why}"
        col = _Collector(wanted, col.boxes, clock)
        with _open(path) as container:
            err = _decode_from_start(container, container.streams.video[0], index, col, clock)
        if err:
            decode += f"; then {err}"
    if not col.got:
        raise ValueError(f"{path}: no video frame could be decoded ({decode})")
    keys = np.asarray(sorted(col.got))
    rgb, substituted, sources = [], 0, []
    for p, c, box in zip(plans, crops, boxes):
        idx = [int(keys[np.abs(keys - tick_src[t]).argmin()]) for t in p.ticks]
        substituted += sum(i != tick_src[t] for i, t in zip(idx, p.ticks))
        rgb.append(clip_from_crops([col.frames[(i, box)] for i in idx], c.flip))
        sources.append(np.asarray(idx, dtype=np.int64))
    clock.lap("resize/crop")
    return DecodedClips(rgb, _nonempty(waveform), [p.start_proportion for p in plans], decode, int(substituted),
                        col.num_decoded, source_frames=sources, crops=crops, source_size=(h, w),
                        num_source_frames=len(index.times))


def _nonempty(waveform: torch.Tensor | None) -> torch.Tensor | None:
    return None if waveform is None or waveform.numel() == 0 else waveform
