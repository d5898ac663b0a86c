"""Tiny synthetic video files for tests and pipeline smoke checks (written with PyAV, no ffmpeg binary).

Frame ``i`` is a flat grey of level ``frame_level(i)`` so tests can tell which source frames a clip
used (``pattern="flat"``), or a moving texture that costs a decoder real work (``pattern="texture"``,
for benchmarks and for comparing pixels), or a still grey ramp that shows where a crop or flip put each
pixel (``pattern="ramp"``); the audio is a sine tone.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

# container -> (video codec, audio codec)
CODECS = {".mp4": ("libx264", "aac"), ".mkv": ("mpeg4", "pcm_s16le"), ".webm": ("libvpx", "libopus")}
PATTERNS = ("flat", "texture", "ramp")
RAMP_BASE = 20


def frame_level(i: int) -> int:
    return (20 + 9 * i) % 256


def texture_frame(i: int, w: int, h: int, fps: float) -> np.ndarray:
    """``[h, w, 3]`` uint8: gratings and a checkerboard drifting at a few pixels per frame, a frame-
    dependent colour cast and fixed fine noise -- roughly the motion and detail of real footage."""
    t = i / fps
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.sin((x + 40 * t) / 9.0) * np.cos((y - 25 * t) / 13.0)
    check = (((x.astype(np.int32) + int(60 * t)) // 24 + (y.astype(np.int32) + int(30 * t)) // 24) % 2) * 0.6 - 0.3
    noise = np.random.default_rng(0).standard_normal((h, w)).astype(np.float32) * 0.15
    base = 128 + 70 * a + 50 * check + 40 * noise
    rgb = np.stack([base + 30 * np.sin(t), base * 0.9 + 20, base * 0.8 + 40 * np.cos(0.7 * t)], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_clip(path, seconds: float = 1.5, fps: int = 10, size=(64, 48), audio: bool = True,
               sample_rate: int = 44100, tone_hz: float = 1000.0, channels: int = 2, pattern: str = "flat",
               gop: int | None = None, preset: str = "ultrafast", crf: int = 10) -> Path:
    """Write a small clip; the codecs follow the extension (``.mp4``, ``.mkv``, ``.webm``).

    ``gop``: a keyframe every ``gop`` frames (fixed, no scene-cut keyframes); default: the encoder's.
    ``preset``/``crf``: libx264 only (``ultrafast`` has no B-frames; ``veryfast`` and slower use them).
    """
    import av

    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    path = Path(path)
    vcodec, acodec = CODECS[path.suffix.lower()]
    w, h = size
    n_frames = int(round(seconds * fps))
    with av.open(str(path), mode="w") as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if vcodec == "libx264":
            vs.options = {"preset": preset, "crf": str(crf)}
            if gop:
                vs.options = {**vs.options, "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        else:
            vs.bit_rate = 2_000_000
        if gop:
            vs.codec_context.gop_size = gop
        if audio:
            if acodec == "libopus":
                sample_rate = 48000
            a_s = out.add_stream(acodec, rate=sample_rate)
            a_s.layout = "stereo" if channels == 2 else "mono"
        _write_frames(out, vs, n_frames, fps, pattern)
        if audio:
            n = int(seconds * sample_rate)
            t = np.arange(n) / sample_rate
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            fmt = a_s.codec_context.codec.audio_formats[0].name if a_s.codec_context.codec.audio_formats else "fltp"
            chunk = a_s.codec_context.frame_size or 1024
            for start in range(0, n, chunk):
                block = np.repeat(wave[None, start:start + chunk], channels, axis=0)
                frame = av.AudioFrame.from_ndarray(_to_format(block, fmt), format=fmt,
                                                   layout="stereo" if channels == 2 else "mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                for packet in a_s.encode(frame):
                    out.mux(packet)
            for packet in a_s.encode():
                out.mux(packet)
    return path


def ramp_frame(w: int, h: int) -> np.ndarray:
    """A still grey ramp, level ``RAMP_BASE + 3 * column + 2 * row``: where a crop or flip put each pixel."""
    r, c = np.mgrid[0:h, 0:w]
    return np.repeat((RAMP_BASE + 3 * c + 2 * r).astype(np.uint8)[..., None], 3, axis=-1)


def _write_frames(out, vs, n_frames: int, fps: int, pattern: str = "flat") -> None:
    """Encode frames ``0 .. n_frames-1`` (flat grey levels, the moving texture or the still ramp) into ``vs``
    and flush it."""
    import av

    w, h = vs.width, vs.height
    for i in range(n_frames):
        if pattern == "flat":
            img = np.full((h, w, 3), frame_level(i), dtype=np.uint8)
        else:
            img = texture_frame(i, w, h, fps) if pattern == "texture" else ramp_frame(w, h)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, fps)
        for packet in vs.encode(frame):
            out.mux(packet)
    for packet in vs.encode():
        out.mux(packet)


def _to_format(block: np.ndarray, fmt: str) -> np.ndarray:
    """[channels, n] float -> the array layout PyAV expects for sample format ``fmt``."""
    planar = fmt.endswith("p")
    base = fmt.rstrip("p")
    if base == "s16":
        block = np.clip(block * 32767, -32768, 32767).astype(np.int16)
    elif base == "flt":
        block = block.astype(np.float32)
    else:
        raise ValueError(f"unsupported sample format {fmt!r}")
    return block if planar else block.T.reshape(1, -1)


def write_corrupt(path) -> Path:
    """A file with a video extension that no demuxer can read."""
    path = Path(path)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return path


def write_raw_h264(path, seconds: float = 1.5, fps: int = 10, size=(64, 48)) -> Path:
    """A raw H.264 elementary stream (``.h264``): packets without timestamps, no index, no audio."""
    import av

    path = Path(path)
    w, h = size
    with av.open(str(path), mode="w", format="h264") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "10"}
        _write_frames(out, vs, int(round(seconds * fps)), fps)
    return path


def write_audio_only(path, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """A ``.mkv`` with a PCM audio track and no video stream."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as out:
        a_s = out.add_stream("pcm_s16le", rate=sample_rate)
        a_s.layout = "mono"
        wave = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sample_rate)) / sample_rate))
        frame = av.AudioFrame.from_ndarray(_to_format(wave[None], "s16"), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
        for packet in a_s.encode(frame):
            out.mux(packet)
        for packet in a_s.encode():
            out.mux(packet)
    return path


def write_empty_audio_track(path, seconds: float = 1.5, fps: int = 10, size=(64, 48)) -> Path:
    """An ``.mkv`` whose audio track exists but holds no sample (zero length)."""
    import av

    path = Path(path)
    w, h = size
    with av.open(str(path), mode="w") as out:
        vs = out.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt, vs.bit_rate = w, h, "yuv420p", 2_000_000
        a_s = out.add_stream("pcm_s16le", rate=16000)
        a_s.layout = "mono"
        _write_frames(out, vs, int(round(seconds * fps)), fps)
        for packet in a_s.encode():  # nothing was encoded: the track stays empty
            out.mux(packet)
    return path


def truncate(src, dst, fraction: float) -> Path:
    """The first ``fraction`` of ``src``'s bytes, as a file that ends mid-stream."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:int(len(data) * fraction)])
    return Path(dst)
