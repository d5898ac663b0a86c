"""The seek path (frames identical to a full decode), its fallback, the uint8 resize and bad inputs."""
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mbt_fast.data import VideoDataset, collate_skip_bad
from mbt_fast.data import video
from mbt_fast.data.testing import (frame_level, truncate, write_audio_only, write_clip, write_empty_audio_track,
                                   write_raw_h264)
from mbt_fast.data.video import assemble_clip, plan_crop, read_clips, resize_uint8

RGB, SPEC = (8, 32, 32), (64, 32)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (container, fps, gop, x264 preset): B-frames (veryfast) and none (ultrafast), short and long GOPs,
# and the other two codecs of the test writer
CASES = [(".mp4", 30, 12, "veryfast"), (".mp4", 24, 5, "ultrafast"), (".mp4", 50, 40, "veryfast"),
         (".mkv", 25, 10, None), (".webm", 30, 8, None)]


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    root = tmp_path_factory.mktemp("seek")
    files = {}
    for ext, fps, gop, preset in CASES:
        kw = {"preset": preset, "crf": 20} if preset else {}
        files[(ext, fps, gop)] = write_clip(root / f"c{fps}_{gop}{ext}", seconds=3.0, fps=fps, size=(80, 48),
                                            pattern="texture", gop=gop, **kw)
    return files


def _keyframes(path):
    with av.open(str(path)) as c:
        return sum(p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size)


@pytest.mark.parametrize("case", [c[:3] for c in CASES], ids=lambda c: f"{c[0][1:]}-{c[1]}fps-gop{c[2]}")
def test_seek_frames_identical_to_full_decode(textured, case):
    path = textured[case]
    assert _keyframes(path) > 2, "the clip must have several GOPs for the seek to matter"
    for mode, seeds in (("train", range(6)), ("eval", [0]), ("test", [0])):
        for seed in seeds:
            a = read_clips(path, 8, (32, 32), mode, num_clips=3, rng=np.random.default_rng(seed))
            b = read_clips(path, 8, (32, 32), mode, num_clips=3, rng=np.random.default_rng(seed), seek=False)
            assert a.decode == "seek" and b.decode == "full: seek=False"
            assert len(a.rgb) == len(b.rgb)
            for x, y in zip(a.rgb, b.rgb):
                assert torch.equal(x, y), (case, mode, seed, (x - y).abs().max().item())
            assert torch.equal(a.waveform, b.waveform) and a.start_proportions == b.start_proportions
            if mode == "train":  # a 0.6 s clip of a 3 s file: the seek decodes only part of it
                assert a.frames_decoded < b.frames_decoded, (a.frames_decoded, b.frames_decoded)


def _fail(container, stream, pts):
    raise av.error.InvalidDataError(1094995529, "injected seek failure")


def _land_late(container, stream, pts):  # a seek that lands on the last keyframe (a lying index)
    container.seek(2**40, stream=stream, backward=True)


@pytest.mark.parametrize("bad_seek", [_fail, _land_late], ids=["raises", "lands-late"])
def test_failed_seek_falls_back_to_full_decode_counted(textured, monkeypatch, bad_seek):
    path = textured[(".mp4", 30, 12)]
    ds = VideoDataset([(str(path), [0])], num_classes=1, rgb_shape=RGB, spectrogram_shape=SPEC, mode="train")
    ref = VideoDataset([(str(path), [0])], num_classes=1, rgb_shape=RGB, spectrogram_shape=SPEC, mode="train",
                       seek=False)
    monkeypatch.setattr(video, "_seek", bad_seek)
    items = [ds[(0, s)] for s in (1, 2, 3)]
    for s, item in zip((1, 2, 3), items):
        expected = ref[(0, s)]
        assert item["decode_fallback"] and torch.equal(item["rgb"], expected["rgb"])
        assert torch.equal(item["spectrogram"], expected["spectrogram"])
    why = "seek failed" if bad_seek is _fail else "seek landed after"
    assert ds.stats["decode_fallback"] == 3 and ds.stats["seek"] == 0
    assert sum(v for k, v in ds.stats.items() if k.startswith(f"fallback: {why}")) == 3, ds.stats
    assert collate_skip_bad(items)["num_decode_fallback"] == 3


def test_items_bit_identical_across_runs_and_instances(textured):
    path = str(textured[(".mp4", 30, 12)])
    kw = dict(num_classes=1, rgb_shape=RGB, spectrogram_shape=SPEC, mode="train")
    a = VideoDataset([(path, [0])], **kw)[(0, 7)]
    b = VideoDataset([(path, [0])], **kw)[(0, 7)]
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["spectrogram"], b["spectrogram"])
    c = VideoDataset([(path, [0])], **kw)[(0, 8)]
    assert not torch.equal(a["rgb"], c["rgb"])


def _tf_bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """tf.image.resize(method='bilinear', antialias=False) in numpy: half-pixel centres, edge clamp."""
    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, wy = axis(img.shape[0], h)
    x0, x1, wx = axis(img.shape[1], w)
    x = img.astype(np.float64)
    rows = x[y0] * (1 - wy)[:, None, None] + x[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


@pytest.mark.parametrize("size", [(37, 61), (256, 455), (70, 200)])
def test_uint8_resize_matches_tf_bilinear_and_value_range(size):
    img = np.random.default_rng(0).integers(0, 256, (96, 170, 3), dtype=np.uint8)
    out = resize_uint8(torch.from_numpy(img), size)
    assert out.dtype == torch.uint8 and out.shape == (3, *size)
    ref = _tf_bilinear(img, *size).transpose(2, 0, 1)
    err = np.abs(out.numpy().astype(np.float64) - ref)
    assert err.max() <= 1.0 + 1e-9, f"max |uint8 resize - tf bilinear| = {err.max():.3f} (mean {err.mean():.3f})"
    plan = plan_crop(96, 170, (32, 32), train=True, rng=np.random.default_rng(1))
    frame = resize_uint8(torch.from_numpy(img), plan.size)
    clip = assemble_clip([frame, frame], (32, 32), plan)
    assert clip.shape == (3, 2, 32, 32) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    levels = (clip + 1) * 127.5  # converted from uint8 once: every value is k * 2/255 - 1
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    crop = frame[:, plan.top:plan.top + 32, plan.left:plan.left + 32]
    crop = crop.flip(-1) if plan.flip else crop
    assert torch.equal(levels.round()[:, 0].to(torch.uint8), crop)


def test_scenic_resize_semantics_kept():
    rng = np.random.default_rng(3)
    eval_plan = plan_crop(360, 640, (224, 224), train=False)
    assert eval_plan.size == (256, 455) and (eval_plan.top, eval_plan.left) == (16, 115) and not eval_plan.flip
    shorts = []
    for _ in range(200):
        p = plan_crop(360, 640, (224, 224), train=True, rng=rng)
        shorts.append(min(p.size))
        assert 0 <= p.top <= p.size[0] - 224 and 0 <= p.left <= p.size[1] - 224
    assert min(shorts) == 231 and 330 <= max(shorts) <= 341  # 256 * [0.9, 1.33], never below the crop


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    mp4 = write_clip(root / "full.mp4", seconds=3.0, fps=10)
    mkv = write_clip(root / "full.mkv", seconds=3.0, fps=10)
    return {
        "truncated_mp4": truncate(mp4, root / "trunc.mp4", 0.6),  # moov atom at the end: unreadable
        "truncated_mkv": truncate(mkv, root / "trunc.mkv", 0.6),  # the first ~60 % still decodes
        "no_video": write_audio_only(root / "audio.mkv"),
        "empty_audio": write_empty_audio_track(root / "empty_audio.mkv"),
        "no_timestamps": write_raw_h264(root / "raw.h264", seconds=1.5, fps=10),
    }


def test_bad_inputs_skipped_or_handled_and_counted(bad_files, caplog):
    keys = list(bad_files)
    ds = VideoDataset([(str(bad_files[k]), [0]) for k in keys], num_classes=1, rgb_shape=RGB,
                      spectrogram_shape=SPEC, mode="eval")
    items = dict(zip(keys, (ds[i] for i in range(len(keys)))))
    assert "skipped" in items["truncated_mp4"] and "trunc.mp4" in items["truncated_mp4"]["skipped"]
    assert "no video stream" in items["no_video"]["skipped"]
    trunc = items["truncated_mkv"]  # planned on the frames present, so its centre clip is still exact
    assert trunc["rgb"].shape == (3, *RGB) and not trunc["decode_fallback"] and not trunc["audio_missing"]
    empty = items["empty_audio"]
    assert empty["audio_missing"] and torch.equal(empty["spectrogram"], torch.zeros(SPEC))
    raw = items["no_timestamps"]
    assert raw["decode_fallback"] and raw["audio_missing"]
    # no pts: frame k is the decoder's k-th output at the SPS rate (10 fps): the 25 fps centre clip
    ticks = int(1.5 * 25)
    off = (ticks - 15) // 2
    expected = [frame_level(int((off + 2 * k) / 25 * 10 + 1e-6)) for k in range(8)]
    got = ((raw["rgb"][0, :, 16, 16] + 1) * 127.5).tolist()
    assert np.allclose(got, expected, atol=3), (got, expected)
    assert ds.stats["skipped"] == 2 and ds.stats["audio_missing"] == 2 and ds.stats["decode_fallback"] == 1
    assert ds.stats["fallback: video packets without timestamps"] == 1
    batch = collate_skip_bad(list(items.values()))
    assert batch["num_skipped"] == 2 and batch["num_decode_fallback"] == 1 and len(batch["label"]) == 3


def test_missing_frames_substituted_and_counted(textured, monkeypatch):
    """A wanted frame that no decode yields (here: hidden from the collector) is replaced by the nearest
    decoded one and counted -- and the seek path never accepts the gap."""
    path = textured[(".mkv", 25, 10)]
    real_add = video._Collector.add

    def drop_frame_2(self, j, frame):  # frame 2 = tick 2, wanted by the first clip
        real_add(self, -1 if j == 2 else j, frame)

    monkeypatch.setattr(video._Collector, "add", drop_frame_2)
    c = read_clips(path, 8, (32, 32), "test", num_clips=2)
    assert c.decode == "full: wanted frames missing after the seek" and c.frames_substituted >= 1
    ds = VideoDataset([(str(path), [0])], num_classes=1, rgb_shape=RGB, spectrogram_shape=SPEC, mode="test",
                      num_clips=2)
    ds[0]
    assert ds.stats["frames_substituted"] >= 1 and ds.stats["decode_fallback"] == 1
