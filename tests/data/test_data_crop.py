"""The video path's crop-only resize and float conversion: bit for bit what resizing the whole frame, then
cropping, flipping and converting gives (the prepared cache does the latter, and its eval clips must match)."""
import av
import numpy as np
import pytest
import torch
from av.video.reformatter import VideoReformatter

from mbt_fast.data import video
from mbt_fast.data.testing import texture_frame, write_clip
from mbt_fast.data.video import (Box, CropPlan, assemble_clip, clip_from_crops, plan_crop, read_clips,
                                 resize_crop_uint8, resize_uint8)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_clip(frames_hwc, box: Box, flip: bool) -> torch.Tensor:
    """The pipeline before the crop-only resize: whole planar frame resized, cropped, stacked, flipped, float."""
    (ch, cw), top, left = box.crop, box.top, box.left
    full = [torch.nn.functional.interpolate(f.permute(2, 0, 1)[None], size=box.size, mode="bilinear",
                                            align_corners=False, antialias=False)[0] for f in frames_hwc]
    x = torch.stack([f[:3, top:top + ch, left:left + cw] for f in full], dim=1)
    return (x.flip(-1) if flip else x).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)


def _boxes(h, w, rng, n):
    """Crops of Scenic-like plans (scale jitter, random/centre crops) plus the frame's corners and edges."""
    for _ in range(n):
        crop = (int(rng.integers(1, min(h, 64) + 1)), int(rng.integers(1, min(w, 64) + 1)))
        p = plan_crop(h, w, crop, train=bool(rng.integers(0, 2)), rng=rng)
        yield Box(p.size, p.top, p.left, crop)
    size = (int(rng.integers(2, 90)), int(rng.integers(2, 90)))
    for top, left in ((0, 0), (size[0] - 1, size[1] - 1), (0, size[1] - 1), (size[0] - 1, 0)):
        yield Box(size, top, left, (1, 1))
    yield Box(size, 0, 0, (size[0], size[1] - 1))
    yield Box(size, 1, 0, (size[0] - 1, size[1]))


def test_crop_resize_is_the_crop_of_the_whole_resize():
    assert video._crop_resize_is_exact(), "torch's uint8 kernel changed: the crop-only resize would be skipped"
    rng = np.random.default_rng(0)
    sources = [(480, 854), (361, 641), (97, 171), (48, 80), (5, 7), (1, 9), (300, 1)]  # odd sizes, up- and downscaling
    checked = 0
    for h, w in sources:
        for c in (3, 4):
            img = torch.from_numpy(rng.integers(0, 256, (h, w, c), dtype=np.uint8))
            planar = img.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # the prepared cache's frames
            for box in _boxes(h, w, rng, 12):
                (ch, cw), top, left = box.crop, box.top, box.left
                want = resize_uint8(img, box.size)[:, top:top + ch, left:left + cw]
                for x in (img, planar):
                    got = resize_crop_uint8(x, box)
                    assert got.shape == (c, ch, cw) and torch.equal(got, want), (h, w, c, box)
                checked += 1
    assert checked > 100


def test_uint8_resize_same_values_in_either_memory_layout():
    # channels-last (the fast kernel path) and planar give the same pixels
    rng = np.random.default_rng(1)
    for h, w, size in ((480, 854, (256, 455)), (37, 61, (301, 535)), (97, 170, (70, 200))):
        img = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cl = resize_uint8(img, size)
        planar = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=size, mode="bilinear",
                                                 align_corners=False, antialias=False)[0]
        assert cl.stride(0) == 1 and torch.equal(cl, planar)


def test_bad_crop_box_is_an_error():
    img = torch.zeros(48, 64, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        resize_crop_uint8(img, Box((40, 50), 30, 0, (16, 16)))
    with pytest.raises(ValueError, match="does not fit"):
        resize_crop_uint8(img, Box((40, 50), 0, -1, (16, 16)))


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("flip", [False, True])
def test_clip_from_crops_both_layouts_flip_and_levels(channels, flip):
    rng = np.random.default_rng(2)
    frames = [torch.from_numpy(rng.integers(0, 256, (50, 70, channels), dtype=np.uint8)) for _ in range(5)]
    box = Box((44, 61), 3, 17, (31, 29))
    ref = _reference_clip(frames, box, flip)
    cl = clip_from_crops([resize_crop_uint8(f, box) for f in frames], flip)  # the video path
    planar = assemble_clip([resize_uint8(f, box.size).contiguous() for f in frames], box.crop,  # the prepared cache
                           CropPlan(box.size, box.top, box.left, flip))
    assert cl.shape == ref.shape == (3, 5, 31, 29) and cl.dtype == torch.float32 and cl.is_contiguous()
    assert torch.equal(cl, ref) and torch.equal(planar, ref)
    assert not torch.equal(clip_from_crops([resize_crop_uint8(f, box) for f in frames], not flip), ref)


def test_rgba_conversion_gives_the_rgb24_values():
    # the collector asks libswscale for rgba (4-byte pixels): its RGB must be rgb24's, for the usual decoder
    # outputs and odd sizes
    r = VideoReformatter()
    for w, h in ((854, 480), (81, 47), (63, 38)):
        src = av.VideoFrame.from_ndarray(texture_frame(3, w, h, 30.0), format="rgb24")
        for fmt in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "yuv420p10le", "nv12", "gray"):
            frame = src.reformat(format=fmt)
            rgb = r.reformat(frame, format="rgb24", threads=1).to_ndarray()
            rgba = r.reformat(frame, format="rgba", threads=1).to_ndarray()
            assert np.array_equal(rgba[..., :3], rgb), (w, h, fmt)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("crop") / "c.mkv", seconds=2.0, fps=25, size=(97, 61),
                      pattern="texture", gop=10)


@pytest.mark.parametrize("mode", ["train", "eval", "test"])
def test_items_equal_the_whole_frame_resize(clip_file, monkeypatch, mode):
    """read_clips with the crop-only resize == with whole frames resized then cropped (the reference path,
    forced by declaring the two passes inexact): train's jitter, crops and flips, eval's and test's centre."""
    seeds = range(8) if mode == "train" else [0]
    fast = [read_clips(clip_file, 6, (40, 48), mode, num_clips=2, rng=np.random.default_rng(s)) for s in seeds]
    monkeypatch.setattr(video, "_crop_resize_is_exact", lambda: False)
    ref = [read_clips(clip_file, 6, (40, 48), mode, num_clips=2, rng=np.random.default_rng(s)) for s in seeds]
    flips = set()
    for a, b in zip(fast, ref):
        assert a.crops == b.crops
        flips.update(c.flip for c in a.crops)
        for x, y in zip(a.rgb, b.rgb):
            assert x.shape == (3, 6, 40, 48) and torch.equal(x, y)
    if mode == "train":
        assert flips == {False, True}
