"""Sidecar modalities of VideoDataset: optical flow aligned with the RGB clip, feature sequences, bad files."""

import numpy as np
import pytest
import torch

from mbt_fast.data import VideoDataset, collate_skip_bad
from mbt_fast.data.testing import RAMP_BASE, frame_level, ramp_frame, write_clip
from mbt_fast.data.video import plan_crop, read_clips

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RGB = (8, 32, 32)
H, W, FRAMES = 48, 64, 15          # write_clip's defaults: 64x48, 1.5 s at 10 fps
ALPHA, BETA = 0.25, 0.5            # the test flow's spatial slopes (x along columns, y along rows)
BIG = 1000.0                       # a flow_scale that never clamps the test flow


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("videos") / "a.mp4", audio=False)  # flat frames: level = frame_level(i)


def make_flow(num_fields=FRAMES - 1, h=H, w=W, dtype=np.float32) -> np.ndarray:
    """Field f: x = f + ALPHA * column, y = -f + BETA * row (a known time and space pattern)."""
    f = np.arange(num_fields, dtype=np.float64)[:, None, None]
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack(np.broadcast_arrays(f + ALPHA * c, -f + BETA * r), axis=-1).astype(dtype)



def resize1d(v: np.ndarray, n_out: int) -> np.ndarray:
    """Bilinear resize along one axis, half-pixel centres, edges clamped, no antialiasing (torch's and
    tf.image.resize's), in float64."""
    n_in = len(v)
    if n_in == n_out:
        return v
    s = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.minimum(np.floor(s).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = s - i0
    return (1 - lam) * v[i0] + lam * v[i1]


def expected_flow(frames, plan, crop, out, num_fields) -> np.ndarray:
    """make_flow's fields for source ``frames`` resized/cropped/flipped by ``plan``, in output pixels
    (before flow_scale): ``[2, T, out_h, out_w]``. The pattern is separable, so each axis is a 1-D resize."""
    (rh, rw), (ch, cw), (oh, ow) = plan.size, crop, out
    cols = resize1d(resize1d(ALPHA * np.arange(W), rw)[plan.left:plan.left + cw], ow)
    rows = resize1d(resize1d(BETA * np.arange(H), rh)[plan.top:plan.top + ch], oh)
    sx, sy = rw / W * ow / cw, rh / H * oh / ch
    if plan.flip:
        cols, sx = cols[::-1], -sx
    f = np.minimum(np.asarray(frames), num_fields - 1).astype(np.float64)[:, None, None]
    x = sx * (f + cols[None, None, :]) + np.zeros((1, oh, 1))
    y = sy * (-f + rows[None, :, None]) + np.zeros((1, 1, ow))
    return np.stack([x, y])


def source_frames(rgb) -> list[int]:
    """[3, T, H, W] of the flat test video -> the source frame each clip frame shows (from its grey level)."""
    lv = ((rgb[0, :, rgb.shape[2] // 2, rgb.shape[3] // 2] + 1) * 127.5).numpy()
    idx = np.rint((lv - frame_level(0)) / 9).astype(int)
    assert np.allclose([frame_level(i) for i in idx], lv, atol=3), lv
    return idx.tolist()


def dataset(video, tmp_path, modalities=("rgb", "flow"), mode="eval", **kw):
    kw = {"rgb_shape": RGB, "flow_root": tmp_path, "features_root": tmp_path, **kw}
    return VideoDataset([(str(video), [0])], num_classes=2, mode=mode, modalities=modalities, **kw)


@pytest.mark.parametrize("out", [(32, 32), (16, 24)])
def test_flow_eval_matches_rgb_frames_crop_and_scale(video, tmp_path, out):
    np.save(tmp_path / "a.flow.npy", make_flow())
    item = dataset(video, tmp_path, flow_shape=(8, *out), flow_scale=BIG)[0]
    flow = item["flow"]
    assert flow.shape == (2, 8, *out) and flow.dtype == torch.float32
    frames = source_frames(item["rgb"])
    assert frames == [4, 5, 6, 6, 7, 8, 9, 10]  # the centre clip: 25 fps ticks 11, 13, .., 25 of a 10 fps video
    plan = plan_crop(H, W, RGB[1:], train=False)
    assert plan.size == (37, 49) and not plan.flip  # short side 48 -> 256/224 * 32, the RGB's resize
    want = expected_flow(frames, plan, RGB[1:], out, FRAMES - 1)
    np.testing.assert_allclose(flow.double().numpy() * BIG, want, atol=1e-4)


def test_flow_train_follows_the_rgb_crop_and_flip(video, tmp_path):
    np.save(tmp_path / "a.flow.npy", make_flow(dtype=np.float16))  # exact in float16; read as float32
    ds = dataset(video, tmp_path, mode="train", flow_scale=BIG)
    flips, sizes = set(), set()
    for seed in range(12):
        item = ds[(0, seed)]
        # the same draws as the dataset's: its RGB proves it, and the plan says where the flow must come from
        clips = read_clips(str(video), RGB[0], RGB[1:], "train", 1, np.random.default_rng(seed), want_audio=False)
        assert torch.equal(clips.rgb[0], item["rgb"])
        frames = source_frames(item["rgb"])
        assert clips.source_frames[0].tolist() == frames
        plan = clips.crops[0]
        flips.add(plan.flip)
        sizes.add(plan.size)
        want = expected_flow(frames, plan, RGB[1:], RGB[1:], FRAMES - 1)
        np.testing.assert_allclose(item["flow"].double().numpy() * BIG, want, atol=1e-4)
        # flow alone draws the same clip and crop, from the packet timestamps only
        alone = dataset(video, tmp_path, modalities=("flow",), mode="train", flow_scale=BIG)[(0, seed)]
        assert "rgb" not in alone and torch.equal(alone["flow"], item["flow"])
    assert flips == {False, True} and len(sizes) > 3  # both flips and the scale jitter were exercised


def test_flow_alone_is_planned_for_flow_shape(video, tmp_path):
    np.save(tmp_path / "a.flow.npy", make_flow())
    shape = (4, 16, 16)  # rgb_shape keeps its default (32, 224, 224): flow alone must not use it
    item = dataset(video, tmp_path, modalities=("flow",), flow_shape=shape, flow_scale=BIG, rgb_shape=(32, 224, 224))[0]
    assert set(item) == {"index", "audio_missing", "decode_fallback", "flow", "label"}
    rgb = dataset(video, tmp_path, modalities=("rgb",), rgb_shape=shape)[0]["rgb"]  # the clip flow must follow
    want = expected_flow(source_frames(rgb), plan_crop(H, W, shape[1:], train=False), shape[1:], shape[1:], FRAMES - 1)
    np.testing.assert_allclose(item["flow"].double().numpy() * BIG, want, atol=1e-4)


def test_plan_only_decodes_no_frame(video):
    full = read_clips(str(video), 8, (32, 32), "test", 3)
    plan = read_clips(str(video), 8, (32, 32), "test", 3, want_rgb=False, want_plan=True)
    assert plan.rgb is None and plan.frames_decoded == 0 and plan.decode == "none"
    assert [s.tolist() for s in plan.source_frames] == [s.tolist() for s in full.source_frames]
    assert plan.crops == full.crops and plan.source_size == (H, W) and plan.num_source_frames == FRAMES


def write_pattern_video(path, size=(48, 40), frames=10, fps=10):
    """Still frames of ``testing.ramp_frame`` (near-lossless); returns the ramp above its base level."""
    write_clip(path, seconds=frames / fps, fps=fps, size=size, audio=False, pattern="ramp", crf=0)
    return ramp_frame(*size)[..., 0].astype(np.float32) - RAMP_BASE


def test_flow_pixels_line_up_with_rgb_pixels(tmp_path):
    """The RGB frames and the flow carry the same spatial pattern: after the random crop/flip they must
    still match pixel for pixel (independently of how the crop was planned)."""
    base, path = RAMP_BASE, tmp_path / "ramp.mp4"
    pattern = write_pattern_video(path)
    np.save(tmp_path / "ramp.flow.npy", np.repeat(np.stack([pattern, pattern], -1)[None], 10, axis=0))
    shape = (4, 32, 32)
    ds = VideoDataset([(str(path), [0])], num_classes=1, mode="train", modalities=("rgb", "flow"),
                      rgb_shape=shape, flow_scale=BIG)
    flips = set()
    for seed in range(8):
        item = ds[(0, seed)]
        plan = read_clips(str(path), 4, (32, 32), "train", 1, np.random.default_rng(seed), want_audio=False).crops[0]
        flips.add(plan.flip)
        sx, sy = plan.size[1] / 48, plan.size[0] / 40
        rgb = (item["rgb"][0].double() + 1) * 127.5 - base   # [T, 32, 32] the pattern as the RGB shows it
        y = item["flow"][1].double() * BIG / sy              # the pattern as the flow's y shows it
        x = item["flow"][0].double() * BIG / sx
        assert (y - rgb).abs().mean() < 1.0 and (y - rgb).abs().max() < 3, seed
        assert (y[..., 1:] - rgb[..., :-1]).abs().mean() > 1.5 and (y[:, 1:] - rgb[:, :-1]).abs().mean() > 1.5  # teeth
        torch.testing.assert_close(x, -y if plan.flip else y, atol=1e-3, rtol=0)
    assert flips == {False, True}


def test_flow_scale_clamp_and_default_location(video, tmp_path):
    clip = tmp_path / "a.mp4"
    clip.symlink_to(video)
    const = np.zeros((FRAMES, H, W, 2), np.float32)
    const[..., 0], const[..., 1] = 3.0, -40.0
    np.save(tmp_path / "a.flow.npy", const)  # beside the video: no flow_root
    kw = dict(num_classes=1, mode="eval", modalities=("rgb", "flow"), rgb_shape=RGB)
    item = VideoDataset([(str(clip), [0])], **kw)[0]
    sx = 49 / 64  # resized 48x64 -> 37x49
    torch.testing.assert_close(item["flow"][0], torch.full((8, 32, 32), 3.0 * sx / 20.0), atol=1e-6, rtol=0)
    assert torch.equal(item["flow"][1], torch.full((8, 32, 32), -1.0))  # -40 * 37/48 / 20 < -1: clamped
    half = VideoDataset([(str(clip), [0])], flow_shape=(8, 16, 16), flow_scale=5.0, **kw)[0]["flow"]
    torch.testing.assert_close(half[0], torch.full((8, 16, 16), 3.0 * sx * 0.5 / 5.0), atol=1e-6, rtol=0)


def test_test_mode_clips_and_last_frame_clamped(video, tmp_path):
    np.save(tmp_path / "a.flow.npy", make_flow(FRAMES - 1))  # no field for the last frame
    feats = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "a.text.npy", feats)
    ds = dataset(video, tmp_path, modalities=("rgb", "flow", "text"), mode="test", num_clips=3, flow_scale=BIG,
                 feature_shapes={"text": (6, 4)})
    item = ds[0]
    assert item["flow"].shape == (3, 2, *RGB) and item["rgb"].shape == (3, 3, *RGB)
    assert item["text"].shape == (3, 6, 4) and item["text_length"] == 3
    assert all(torch.equal(item["text"][k], item["text"][0]) for k in range(3))
    plan = plan_crop(H, W, RGB[1:], train=False)
    for k in range(3):
        frames = source_frames(item["rgb"][k])
        want = expected_flow(frames, plan, RGB[1:], RGB[1:], FRAMES - 1)
        np.testing.assert_allclose(item["flow"][k].double().numpy() * BIG, want, atol=1e-4)
    assert frames[-1] == FRAMES - 1  # the last clip ends on the last frame, which has no field: the last one (13)
    np.testing.assert_allclose(item["flow"][2, :, -1].double().numpy() * BIG,
                               expected_flow([FRAMES - 2], plan, RGB[1:], RGB[1:], FRAMES)[:, 0], atol=1e-4)


def test_features_padded_truncated_and_collated(video, tmp_path):
    data = np.arange(8 * 4, dtype=np.float16).reshape(8, 4)
    np.save(tmp_path / "a.imu.npy", data[:3])
    np.save(tmp_path / "b.imu.npy", data)
    other = tmp_path / "b.mp4"
    other.symlink_to(video)
    np.save(tmp_path / "a.flow.npy", make_flow())
    np.save(tmp_path / "b.flow.npy", make_flow())
    ds = VideoDataset([(str(video), [0]), (str(other), [1]), (str(tmp_path / "c.mp4"), [1])], num_classes=2,
                      mode="eval", modalities=("rgb", "flow", "imu"), rgb_shape=RGB, flow_root=tmp_path,
                      features_root=tmp_path, feature_shapes={"imu": (5, 4)})
    short, long, missing = ds[0], ds[1], ds[2]
    assert short["imu"].dtype == torch.float32 and short["imu_length"] == 3 and long["imu_length"] == 5
    assert torch.equal(short["imu"][:3], torch.from_numpy(data[:3].astype(np.float32)))
    assert torch.equal(short["imu"][3:], torch.zeros(2, 4))           # padded with zeros
    assert torch.equal(long["imu"], torch.from_numpy(data[:5].astype(np.float32)))  # truncated
    assert "skipped" in missing
    batch = collate_skip_bad([short, missing, long])
    assert batch["num_skipped"] == 1 and batch["index"].tolist() == [0, 1]
    assert batch["flow"].shape == (2, 2, *RGB) and torch.equal(batch["flow"][1], long["flow"])
    assert batch["imu"].shape == (2, 5, 4) and torch.equal(batch["imu"][0], short["imu"])
    assert batch["imu_length"].dtype == torch.int64 and batch["imu_length"].tolist() == [3, 5]
    assert batch["rgb"].shape == (2, 3, *RGB) and batch["label"].shape == (2, 2)


def bad_item(ds, caplog, name):
    item = ds[0]
    assert set(item) == {"skipped", "index", "sidecar"}, item.keys()  # a sidecar problem, not the video
    assert ds.num_skipped == 1 and ds.stats["skipped"] == 1
    assert any(name in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    return item["skipped"]


def test_missing_and_unreadable_sidecars_skip_the_item(video, tmp_path, caplog):
    reason = bad_item(dataset(video, tmp_path), caplog, "a.flow.npy")
    assert f"sidecar file {tmp_path / 'a.flow.npy'} does not exist" in reason
    (tmp_path / "a.flow.npy").write_bytes(b"not a numpy file")
    reason = bad_item(dataset(video, tmp_path), caplog, "a.flow.npy")
    assert f"sidecar file {tmp_path / 'a.flow.npy'} is unreadable" in reason
    ds = dataset(video, tmp_path, modalities=("rgb", "text"), feature_shapes={"text": (4, 8)})
    assert f"sidecar file {tmp_path / 'a.text.npy'} does not exist" in bad_item(ds, caplog, "a.text.npy")


@pytest.mark.parametrize("shape, dtype, want", [
    ((FRAMES - 1, W, H, 2), np.float32, f"expected shape [15 or 14, {H}, {W}, 2] (the video's frames, height, "
                                        f"width), got [14, {W}, {H}, 2]"),
    ((FRAMES - 5, H, W, 2), np.float32, f"expected shape [15 or 14, {H}, {W}, 2]"),
    ((FRAMES + 1, H, W, 2), np.float32, f"got [16, {H}, {W}, 2]"),
    ((FRAMES, H, W, 3), np.float32, f"expected shape [frames, H, W, 2] with frames >= 1, got [15, {H}, {W}, 3]"),
    ((FRAMES, H, W, 2), np.int16, "expected a float array (float16/float32), got dtype int16"),
])
def test_wrong_flow_file_skips_naming_expected_and_actual(video, tmp_path, caplog, shape, dtype, want):
    np.save(tmp_path / "a.flow.npy", np.zeros(shape, dtype))
    reason = bad_item(dataset(video, tmp_path, modalities=("flow",)), caplog, "a.flow.npy")
    assert str(tmp_path / "a.flow.npy") in reason and want in reason, reason


def test_wrong_feature_width_skips_naming_expected_and_actual(video, tmp_path, caplog):
    np.save(tmp_path / "a.text.npy", np.zeros((3, 5), np.float32))
    ds = dataset(video, tmp_path, modalities=("text",), feature_shapes={"text": (4, 8)})
    reason = bad_item(ds, caplog, "a.text.npy")
    assert f"feature file {tmp_path / 'a.text.npy'}: expected shape [rows, 8]" in reason and "got [3, 5]" in reason


def test_constructor_checks(tmp_path):
    with pytest.raises(ValueError, match=r"flow_shape \(4, 32, 32\) and rgb_shape \(8, 32, 32\)"):
        VideoDataset([], num_classes=1, modalities=("rgb", "flow"), rgb_shape=RGB, flow_shape=(4, 32, 32))
    VideoDataset([], num_classes=1, modalities=("flow",), rgb_shape=RGB, flow_shape=(4, 32, 32))  # no rgb: fine
    with pytest.raises(ValueError, match=r"feature_shapes: modality 'text' is read from '<video stem>.text.npy'"):
        VideoDataset([], num_classes=1, modalities=("rgb", "text"))
    with pytest.raises(ValueError, match=r"feature_shapes\['text'\]: expected \(n, d_in\)"):
        VideoDataset([], num_classes=1, modalities=("text",), feature_shapes={"text": (4,)})
    with pytest.raises(ValueError, match="flow_scale"):
        VideoDataset([], num_classes=1, modalities=("flow",), flow_scale=0)
    for name in ("label", "num_skipped", "text_length", "a/b", ""):
        with pytest.raises(ValueError, match="not a usable modality name"):
            VideoDataset([], num_classes=1, modalities=(name,), feature_shapes={name: (1, 1)})


def test_a_prepared_cache_refuses_flow(tmp_path):
    from mbt_fast.data.prepared import PreparedDataset, PreparedError

    with pytest.raises(PreparedError, match="a prepared cache has no optical flow"):
        PreparedDataset(tmp_path, num_classes=2, modalities=("rgb", "flow"))
