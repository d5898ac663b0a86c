"""The prepared cache: same tensors as the video path for the same seed, resumable, corrupt files skipped."""
import json

import pytest
import torch

import mbt_fast
from mbt_fast.cli import main as cli_main
from mbt_fast.data import PreparedDataset, VideoDataset, prepare
from mbt_fast.data import prepared as prepared_mod
from mbt_fast.data.testing import write_clip, write_corrupt

KW = dict(rgb_shape=(8, 32, 32), spectrogram_shape=(64, 32))  # the tiny preset's shapes
PREP = dict(crop=32, num_mel=32, progress=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _folder(root, pattern="texture"):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    write_clip(root / "a" / "1.mp4", seconds=2.0, size=(64, 48), pattern=pattern, gop=5)
    write_clip(root / "a" / "2.mkv", seconds=1.2, size=(80, 48), pattern=pattern, tone_hz=500.0)
    write_clip(root / "b" / "3.mp4", seconds=1.0, size=(48, 64), pattern=pattern, audio=False)
    write_corrupt(root / "b" / "4.mp4")
    write_clip(root / "b" / "5.webm", seconds=1.0, size=(64, 48), pattern=pattern)
    return root


def _pairs(videos, prep, mode, seeds=(3, 11)):
    v = VideoDataset.from_folder(videos, mode=mode, **KW)
    p = PreparedDataset(prep, mode=mode, **KW)
    assert len(v) == len(p) and p.num_classes == v.num_classes and not p.multi_label
    for i in range(len(v)):
        for s in seeds:
            yield i, v[(i, s)], p[(i, s)]


def test_eval_clips_are_identical_and_train_clips_match_within_the_resize(tmp_path):
    videos = _folder(tmp_path / "v")
    index = prepare(videos, tmp_path / "p", clips_per_shard=2, **PREP)
    assert index["num_items"] == 5 and index["num_skipped"] == 1
    for i, a, b in _pairs(videos, tmp_path / "p", "eval"):
        assert ("skipped" in a) == ("skipped" in b)
        if "skipped" not in a:  # the stored size is eval's: no second resize, identical tensors
            assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["spectrogram"], b["spectrogram"]), i
            assert a["audio_missing"] == b["audio_missing"]
    for i, a, b in _pairs(videos, tmp_path / "p", "train", seeds=range(6)):
        if "skipped" in a:
            assert "4.mp4" in b["skipped"] and "unreadable when prepared" in b["skipped"]
            continue
        # scale jitter: resized from the stored frames, not the source (a second bilinear resample);
        # the same frames, crop and flip, else the error would be tens of levels everywhere
        err = (a["rgb"] - b["rgb"]).abs()
        assert err.mean() <= 4 * 2 / 255, (i, err.mean().item())
        assert torch.equal(a["spectrogram"], b["spectrogram"])  # same window and SpecAugment mask


def test_train_clips_pick_the_same_frames(tmp_path):
    # flat frames: any resize of a constant is that constant, so what remains is the choice of frames
    videos = _folder(tmp_path / "v", pattern="flat")
    prepare(videos, tmp_path / "p", **PREP)
    n = 0
    for i, a, b in _pairs(videos, tmp_path / "p", "train", seeds=range(8)):
        if "skipped" not in a:
            assert torch.equal(a["rgb"], b["rgb"]), i
            n += 1
    assert n == 32


def test_an_interrupted_prepare_keeps_its_shards(tmp_path, monkeypatch):
    videos = _folder(tmp_path / "v")
    out = tmp_path / "p"
    full = prepare(videos, out, clips_per_shard=2, **PREP)
    shards = sorted(out.glob("shard-*.safetensors"))
    assert [s.name for s in shards] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    (out / "index.json").unlink()
    (out / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # killed while writing it
    calls = []
    real = prepared_mod.prepare_clip
    monkeypatch.setattr(prepared_mod, "prepare_clip", lambda path, *a: calls.append(path) or real(path, *a))
    with pytest.raises(prepared_mod.PreparedError, match="no index.json"):
        PreparedDataset(out, mode="eval", **KW)
    again = prepare(videos, out, clips_per_shard=2, **PREP)
    assert [c.rsplit("/", 1)[-1] for c in calls] == ["3.mp4", "4.mp4"]  # only the missing shard's videos
    assert again == full and shards[0].stat().st_mtime_ns == kept and not list(out.glob("*.tmp"))
    with pytest.raises(prepared_mod.PreparedError, match="another list or with other parameters"):
        prepare(videos, out, clips_per_shard=2, crop=48, num_mel=32, progress=False)


def test_prepared_csv_needs_num_classes_and_checks_mel_bins(tmp_path):
    videos = _folder(tmp_path / "v")
    csv = tmp_path / "list.csv"
    csv.write_text("path,labels\n" + "".join(f"{p},{i % 3};2\n" for i, p in enumerate(sorted(videos.rglob("*.*")))))
    prepare(csv, tmp_path / "p", **PREP)
    with pytest.raises(prepared_mod.PreparedError, match="give --num-classes"):
        PreparedDataset(tmp_path / "p", mode="eval", **KW)
    ds = PreparedDataset(tmp_path / "p", num_classes=3, mode="eval", **KW)
    assert ds.multi_label and ds[0]["label"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(prepared_mod.PreparedError, match="32-bin log-mels, the model wants 128"):
        PreparedDataset(tmp_path / "p", num_classes=3, mode="eval", rgb_shape=(8, 32, 32), spectrogram_shape=(64, 128))


def test_cli_prepare_then_train_with_workers(tmp_path, capsys):
    videos = _folder(tmp_path / "v")
    out = tmp_path / "p"
    assert cli_main(["prepare", str(videos), "--out", str(out), "--crop", "32", "--num-mel", "32", "--no-progress"]) == 0
    assert "prepared 4 of 5 videos" in capsys.readouterr().out
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--prepared", str(out), "--steps", "3", "--batch-size", "2",
            "--num-workers", "2", "--no-progress", "--threads", "1", "--out", str(run)]
    assert cli_main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["data_s"] >= 0 for r in rows)
    model = mbt_fast.MBT.from_pretrained(run / "model.safetensors")
    assert model.cfg.num_classes == 2
    assert cli_main(["prepare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "neither a CSV file nor a folder" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "tiny", "--prepared", str(videos), "--out", str(tmp_path / "r2")]) == 2
    assert "no index.json" in capsys.readouterr().err
