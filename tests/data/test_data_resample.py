"""The demux pass resamples the audio track in blocks of frames: the same samples as frame by frame."""
import av
import numpy as np
import pytest

from mbt_fast.data import video
from mbt_fast.data.audio import SAMPLE_RATE
from mbt_fast.data.testing import write_clip


def _per_frame(frames) -> np.ndarray:
    """The reference: every decoded frame through the resampler on its own, then its tail."""
    r = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    for f in frames:
        f.pts = None
        chunks.extend(x.to_ndarray().reshape(-1) for x in r.resample(f))
    chunks.extend(x.to_ndarray().reshape(-1) for x in r.resample(None))
    return np.concatenate(chunks)


def _blocks(frames) -> np.ndarray:
    audio = video._Resampled()
    for f in frames:
        audio.add(f)
    return audio.finish().numpy()


def _decoded(path):
    with av.open(str(path)) as c:
        return [f for p in c.demux(c.streams.audio[0]) for f in p.decode()]


@pytest.fixture(scope="module")
def tracks(tmp_path_factory):
    root = tmp_path_factory.mktemp("resample")
    return {  # AAC (planar float), PCM s16 (packed), Opus; stereo and mono; 48, 44.1, 22.05 and 16 kHz
        "aac48": write_clip(root / "a.mp4", seconds=3.0, sample_rate=48000),
        "aac22-mono": write_clip(root / "b.mp4", seconds=2.0, sample_rate=22050, channels=1),
        "pcm44": write_clip(root / "c.mkv", seconds=2.0, sample_rate=44100),
        "pcm16-mono": write_clip(root / "d.mkv", seconds=2.0, sample_rate=16000, channels=1),
        "opus": write_clip(root / "e.webm", seconds=2.0),
    }


@pytest.mark.parametrize("block", [video.AUDIO_BLOCK, 1024, 1500, 7])
def test_block_resampling_equals_frame_by_frame(tracks, monkeypatch, block):
    monkeypatch.setattr(video, "AUDIO_BLOCK", block)  # block ends on and between frame ends, and many blocks
    for name, path in tracks.items():
        frames = _decoded(path)
        assert len(frames) > 2
        want, got = _per_frame(_decoded(path)), _blocks(frames)
        assert got.dtype == np.float32 and got.shape == want.shape and np.array_equal(got, want), name


def test_already_16k_mono_float_passes_through():
    rng = np.random.default_rng(0)
    frames = []
    for n in (1024, 1000, 1024, 333):
        f = av.AudioFrame.from_ndarray(rng.standard_normal((1, n)).astype(np.float32), format="flt", layout="mono")
        f.sample_rate = SAMPLE_RATE
        frames.append(f)
    want = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert np.array_equal(_blocks(frames), want) and np.array_equal(_per_frame(frames), want)


@pytest.mark.parametrize("change", ["rate", "layout", "format"])
def test_a_frame_of_another_kind_is_refused_as_before(change):
    # (the AudioFifo itself does not compare layouts: it would take a stereo frame's first channel)
    kinds = {"rate": [("fltp", "stereo", 48000)] * 2 + [("fltp", "stereo", 44100)],
             "layout": [("fltp", "mono", 48000)] * 2 + [("fltp", "stereo", 48000)],
             "format": [("fltp", "stereo", 48000)] * 2 + [("s16p", "stereo", 48000)]}[change]
    frames = []
    for fmt, layout, rate in kinds:
        dtype = np.float32 if fmt == "fltp" else np.int16
        f = av.AudioFrame.from_ndarray(np.zeros((1 if layout == "mono" else 2, 1024), dtype=dtype), format=fmt,
                                       layout=layout)
        f.sample_rate = rate
        frames.append(f)
    with pytest.raises(ValueError, match="does not match"):
        _per_frame(frames)
    with pytest.raises(ValueError, match="does not match"):
        _blocks(frames)
