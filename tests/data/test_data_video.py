"""Video files -> MBT inputs: decoding (mp4/mkv/webm), 25 fps resampling, crops, audio, bad files."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mbt_fast.data import ResumableSampler, VideoDataset, collate_skip_bad, read_csv, read_folder
from mbt_fast.data.testing import frame_level, write_clip, write_corrupt
from mbt_fast.data.video import plan_clips, read_clips, ticks_to_source_frames

RGB, SPEC = (8, 32, 32), (64, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    (root / "dog").mkdir()
    (root / "cat").mkdir()
    files = {
        "mp4": write_clip(root / "dog" / "a.mp4"),
        "mkv": write_clip(root / "cat" / "b.mkv", tone_hz=3000.0, channels=1, sample_rate=22050),
        "webm": write_clip(root / "dog" / "c.webm", seconds=1.0),
        "noaudio": write_clip(root / "cat" / "d.mp4", audio=False),
        "short": write_clip(root / "cat" / "e.mkv", seconds=0.3),
        "corrupt": write_corrupt(root / "dog" / "f.mp4"),
    }
    return root, files


def levels(rgb):  # [3, T, H, W] in [-1, 1] -> grey level of each frame
    return ((rgb[0, :, rgb.shape[2] // 2, rgb.shape[3] // 2] + 1) * 127.5).tolist()


@pytest.mark.parametrize("kind", ["mp4", "mkv", "webm"])
def test_decode_containers_at_25fps(clips, kind):
    _, files = clips
    c = read_clips(files[kind], 8, (32, 32), "eval")
    rgb = c.rgb[0]
    assert rgb.shape == (3, 8, 32, 32) and rgb.dtype == torch.float32
    assert rgb.min() >= -1 and rgb.max() <= 1
    seconds = 1.5 if kind != "webm" else 1.0
    ticks = int(seconds * 25)
    off = (ticks - 15) // 2  # centre clip of 8 frames at stride 2
    src = [int((off + 2 * k) / 25 * 10 + 1e-6) for k in range(8)]  # 10 fps source frame on show at each tick
    expected = [frame_level(i) for i in src]
    assert np.allclose(levels(rgb), expected, atol=3), (levels(rgb), expected)
    assert c.waveform is not None and abs(len(c.waveform) - seconds * 16000) < 0.05 * 16000


def test_tick_mapping_and_clip_plans():
    times = np.arange(10) / 10.0  # 10 fps, 1 s
    src = ticks_to_source_frames(times)
    assert len(src) == 25 and src[:6].tolist() == [0, 0, 0, 1, 1, 2]
    plans = plan_clips(40, 4, "test", num_clips=3)
    assert [p.ticks[0] for p in plans] == [0, 16, 33] and plans[2].ticks.tolist() == [33, 35, 37, 39]
    short = plan_clips(5, 4, "eval")[0]
    assert short.ticks.tolist() == [0, 2, 4, 1]  # repeated from the start
    rng = np.random.default_rng(0)
    offs = {plan_clips(40, 4, "train", rng=rng)[0].ticks[0] for _ in range(50)}
    assert min(offs) >= 0 and max(offs) <= 33 and len(offs) > 10


def test_dataset_items_missing_audio_and_corrupt(clips, caplog):
    root, files = clips
    ds = VideoDataset([(str(files[k]), [i]) for i, k in enumerate(["mp4", "noaudio", "corrupt", "short"])],
                      num_classes=4, rgb_shape=RGB, spectrogram_shape=SPEC, multi_label=False, mode="eval")
    good = ds[0]
    assert good["rgb"].shape == (3, *RGB) and good["spectrogram"].shape == SPEC
    assert not good["audio_missing"] and good["spectrogram"].abs().sum() > 0
    assert torch.equal(good["label"], torch.tensor([1.0, 0, 0, 0]))
    quiet = ds[1]
    assert quiet["audio_missing"] and torch.equal(quiet["spectrogram"], torch.zeros(SPEC)) and ds.num_audio_missing == 1
    bad = ds[2]
    assert "skipped" in bad and ds.num_skipped == 1
    assert any("skipping unreadable video" in r.message for r in caplog.records)
    short = ds[3]  # 0.3 s: 8 ticks < 15-tick span and 31 spectrogram frames < 64: both repeated
    assert short["rgb"].shape == (3, *RGB) and short["spectrogram"].shape == SPEC
    assert torch.equal(short["spectrogram"][:31], short["spectrogram"][31:62])
    batch = collate_skip_bad([good, quiet, bad, short, None])
    assert batch["rgb"].shape == (3, 3, *RGB) and batch["num_skipped"] == 2 and batch["num_audio_missing"] == 1
    assert batch["index"].tolist() == [0, 1, 3]
    assert set(collate_skip_bad([bad])) == {"num_skipped", "skipped", "num_audio_missing", "num_decode_fallback"}


def test_train_mode_seeded_and_multiclip_test(clips):
    _, files = clips
    kw = dict(num_classes=3, rgb_shape=RGB, spectrogram_shape=SPEC)
    train = VideoDataset([(str(files["mp4"]), [0, 2])], mode="train", **kw)
    a, b = train[(0, 123)], train[(0, 123)]
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["spectrogram"], b["spectrogram"])
    assert torch.equal(a["label"], torch.tensor([1.0, 0, 1]))  # multi-hot
    specs = [train[(0, s)]["spectrogram"] for s in range(8)]
    assert any(not torch.equal(specs[0], s) for s in specs[1:])  # random window / SpecAugment
    test = VideoDataset([(str(files["mp4"]), [1])], mode="test", num_clips=4, **kw)
    item = test[0]
    assert item["rgb"].shape == (4, 3, *RGB) and item["spectrogram"].shape == (4, *SPEC)
    first, last = levels(item["rgb"][0]), levels(item["rgb"][3])
    assert abs(first[0] - frame_level(0)) < 3 and abs(last[-1] - frame_level(14)) < 3  # linspaced over the video
    rgb_only = VideoDataset([(str(files["mkv"]), [0])], mode="eval", modalities=("rgb",), **kw)[0]
    assert "spectrogram" not in rgb_only and "rgb" in rgb_only


def test_folder_csv_and_loader_epoch(clips, tmp_path):
    root, files = clips
    items, classes = read_folder(root)
    assert classes == ["cat", "dog"] and len(items) == 6
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,labels\n{files['mp4']},1;5\n{files['mkv'].relative_to(root)},7\n\n")
    rows = read_csv(csv, root=root)
    assert rows == [(str(files["mp4"]), [1, 5]), (str(root / files["mkv"].relative_to(root)), [7])]
    with pytest.raises(ValueError, match="labels"):
        (tmp_path / "bad.csv").write_text("x.mp4,dog\n")
        read_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=f"CSV '{tmp_path / 'none.csv'}' does not exist"):
        read_csv(tmp_path / "none.csv")
    with pytest.raises(ValueError, match=f"CSV '{tmp_path}' is a directory"):
        read_csv(tmp_path)
    (tmp_path / "header.csv").write_text("path,labels\n\n")
    with pytest.raises(ValueError, match=r"lists no clip \(expected rows 'path,labels'\)"):
        read_csv(tmp_path / "header.csv")
    with pytest.raises(ValueError, match="outside"):
        VideoDataset([("x.mp4", [600])], num_classes=527)
    ds = VideoDataset.from_folder(root, rgb_shape=RGB, spectrogram_shape=SPEC, mode="train")
    assert ds.num_classes == 2 and not ds.multi_label
    loader = DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, seed=0), collate_fn=collate_skip_bad)
    batches = list(loader)  # one whole epoch over a folder with a corrupt file and a silent one
    assert sum(b["num_skipped"] for b in batches) == 1
    assert sum(len(b["label"]) for b in batches if "label" in b) == 5
    assert sum(b["num_audio_missing"] for b in batches) == 1


def test_resumable_sampler_positions_and_seeds():
    data = list(range(10))
    full = list(ResumableSampler(data, seed=3))
    s = ResumableSampler(data, seed=3)
    s.set_position(0, 4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_position(1, 0)
    assert [i for i, _ in s] != [i for i, _ in full] and sorted(i for i, _ in s) == data
    r0, r1 = ResumableSampler(data, 2, 0, seed=3), ResumableSampler(data, 2, 1, seed=3)
    assert sorted([i for i, _ in r0] + [i for i, _ in r1]) == data
