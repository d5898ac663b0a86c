"""``mbt-fast predict`` and ``embed``: a converted Scenic checkpoint (the shared fixture and generated
ones) on generated video files with and without audio; names, scores, batching, bad input."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import mbt_fast
from mbt_fast import inference
from mbt_fast.cli import main
from mbt_fast.data.testing import write_clip, write_corrupt
from scenic_oracle import scenic_param_tree, write_scenic_checkpoint

# a Scenic config like the fixture's, with other sizes (never tuned to the fixture)
CFG = mbt_fast.MBTConfig(hidden_size=32, num_heads=1, mlp_dim=48, num_layers=2, fusion_layer=1, n_bottlenecks=2,
                         num_classes=6, input_shapes={"rgb": (-1, 2, 32, 32, 3), "spectrogram": (-1, 64, 16, 3)})


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    write_clip(d / "a_tone.mp4", seconds=2.0, fps=25, size=(64, 48), pattern="texture", tone_hz=440.0)
    write_clip(d / "b_high.mkv", seconds=1.5, fps=25, size=(48, 64), tone_hz=3000.0)
    write_clip(d / "c_silent.mp4", seconds=2.0, fps=25, size=(64, 48), audio=False, pattern="texture")
    return d


@pytest.fixture(scope="module")
def scenic_model(tmp_path_factory):
    """(Scenic checkpoint, its config JSON, the converted safetensors)."""
    d = tmp_path_factory.mktemp("model")
    ckpt, config = d / "checkpoint_9", d / "config.json"
    write_scenic_checkpoint(ckpt, scenic_param_tree(CFG, seed=3))
    config.write_text(json.dumps(CFG.to_dict()))
    assert main(["convert", str(ckpt), "--config", str(config), "--out", str(d / "m.safetensors")]) == 0
    return ckpt, config, d / "m.safetensors"


def predictions(capsys, argv):
    rc = main(["predict", *argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    return rc, [json.loads(line) for line in captured.out.splitlines()], captured.err


def expected_scores(model, path, num_clips, multi):
    clip = inference.decode_clip(path, model.cfg, num_clips)
    with torch.no_grad():
        logits = model(**clip.inputs, missing="drop").mean(0)
    return clip, inference.scores(logits, multi)


def test_predict_json_matches_the_model(capsys, videos, scenic_model):
    _, _, st = scenic_model
    rc, rows, err = predictions(capsys, [str(st), str(videos), "--top-k", "3", "--num-clips", "2", "--batch-size", "2"])
    assert rc == 0, err
    model = mbt_fast.MBT.from_pretrained(st)
    assert [r["file"] for r in rows] == sorted(str(p) for p in videos.iterdir())
    for r in rows:
        clip, s = expected_scores(model, r["file"], 2, multi=False)
        assert r["score"] == "softmax" and r["num_clips"] == 2 and r["modalities"] == list(clip.present)
        top = s.topk(3)
        assert [t["index"] for t in r["top"]] == top.indices.tolist()
        np.testing.assert_allclose([t["score"] for t in r["top"]], top.values.numpy(), rtol=1e-5, atol=1e-6)
        assert [t["name"] for t in r["top"]] == [f"class {i}" for i in top.indices.tolist()]
    silent = next(r for r in rows if r["file"].endswith("c_silent.mp4"))
    assert silent["modalities"] == ["rgb"]
    assert "c_silent.mp4 has no audio track; answered from rgb only" in err
    # two different clips get different answers (the inputs reach the scores)
    assert rows[0]["top"] != rows[1]["top"]


def test_scenic_checkpoint_with_config_answers_as_the_converted_file(capsys, videos, scenic_model):
    ckpt, config, st = scenic_model
    f = str(videos / "a_tone.mp4")
    _, a, _ = predictions(capsys, [str(ckpt), f, "--config", str(config)])
    _, b, _ = predictions(capsys, [str(st), f])
    assert a[0]["top"] == b[0]["top"]


def test_shared_fixture(capsys, videos, scenic_fixtures, tmp_path):
    """Google's own checkpoint, converted, on generated files: answers equal the model on the same inputs."""
    st = tmp_path / "fixture.safetensors"
    assert main(["convert", str(scenic_fixtures / "tiny_token_av" / "checkpoint_1234"), "--config",
                 str(scenic_fixtures / "tiny_token_av" / "config.json"), "--out", str(st)]) == 0
    capsys.readouterr()
    rc, rows, err = predictions(capsys, [str(st), str(videos / "a_tone.mp4"), str(videos / "c_silent.mp4"),
                                         "--backend", "torch"])
    assert rc == 0, err
    model = mbt_fast.MBT.from_pretrained(st)
    for r in rows:
        _, s = expected_scores(model, r["file"], 1, multi=False)
        assert r["top"][0]["index"] == int(s.argmax())
        np.testing.assert_allclose(r["top"][0]["score"], float(s.max()), rtol=1e-5)


def test_audioset_names_and_sigmoid_for_527_classes(capsys, videos, tmp_path):
    cfg = dataclasses.replace(CFG, num_classes=527)
    torch.manual_seed(0)
    model = mbt_fast.MBT(cfg)
    torch.nn.init.normal_(model.head.weight)
    model.save_pretrained(tmp_path / "as.safetensors")
    rc, rows, _ = predictions(capsys, [str(tmp_path / "as.safetensors"), str(videos / "a_tone.mp4")])
    assert rc == 0 and rows[0]["score"] == "sigmoid"
    names = inference.audioset_names()
    assert len(names) == 527 and names[0] == "Speech" and names[137] == "Music" and names[526] == "Field recording"
    assert all(t["name"] == names[t["index"]] for t in rows[0]["top"])
    _, s = expected_scores(model.eval(), videos / "a_tone.mp4", 1, multi=True)
    np.testing.assert_allclose(rows[0]["top"][0]["score"], float(s.max()), rtol=1e-5)


def test_class_names_from_metadata_and_labels_file(capsys, videos, tmp_path, scenic_model):
    _, _, st = scenic_model
    model = mbt_fast.MBT.from_pretrained(st)
    names = ["dog", "cat", "car", "rain", "music", "speech"]
    model.save_pretrained(tmp_path / "named.safetensors", class_names=names, multi_label=True)
    f = str(videos / "b_high.mkv")
    _, rows, _ = predictions(capsys, [str(tmp_path / "named.safetensors"), f])
    assert rows[0]["score"] == "sigmoid" and all(t["name"] == names[t["index"]] for t in rows[0]["top"])
    labels = tmp_path / "labels.csv"
    labels.write_text("index,name\n" + "".join(f"{i},n{i}\n" for i in range(6)))
    _, rows, _ = predictions(capsys, [str(tmp_path / "named.safetensors"), f, "--labels", str(labels), "--single-label"])
    assert rows[0]["score"] == "softmax" and all(t["name"] == f"n{t['index']}" for t in rows[0]["top"])
    lines = tmp_path / "labels.txt"
    lines.write_text("\n".join(f"x{i}" for i in range(6)) + "\n")
    assert inference.read_labels_file(lines) == [f"x{i}" for i in range(6)]


def test_bad_files_are_reported_and_skipped(capsys, videos, scenic_model, tmp_path):
    _, _, st = scenic_model
    d = tmp_path / "mixed"
    shutil.copytree(videos, d)
    write_corrupt(d / "broken.mp4")
    (d / "notes.mp4").write_text("not a video")
    rc, rows, err = predictions(capsys, [str(st), str(d), str(tmp_path / "nope.mp4"), "--num-workers", "2",
                                         "--batch-size", "4"])
    assert rc == 1  # the others were answered; the status says not all were
    assert [r["file"] for r in rows] == sorted(str(p) for p in d.iterdir()) + [str(tmp_path / "nope.mp4")]
    good = [r for r in rows if "top" in r]
    assert len(good) == 3 and len(rows) == 6
    assert {r["file"].rsplit("/", 1)[-1] for r in rows if "error" in r} == {"broken.mp4", "notes.mp4", "nope.mp4"}
    assert "notes.mp4: not a readable video" in err and "nope.mp4: does not exist" in err
    assert "3 of 6 file(s) could not be read" in err


@pytest.mark.parametrize("argv,match", [
    (["{missing_model}", "{video}"], "does not exist; expected a model file"),
    (["{ckpt}", "{video}"], "not a safetensors file; a Scenic checkpoint needs its config"),
    (["{ckpt}", "{video}", "--config", "{other_config}"], "checkpoint_9"),
    (["{st}", "{video}", "--labels", "{short_labels}"], "expected 6 class names .* got 2"),
    (["{st}", "{empty_dir}"], "a folder with no video file"),
])
def test_clear_errors(capsys, videos, scenic_model, tmp_path, argv, match):
    ckpt, _, st = scenic_model
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dataclasses.replace(CFG, hidden_size=64, num_heads=2).to_dict()))
    (tmp_path / "short.txt").write_text("a\nb\n")
    (tmp_path / "empty").mkdir()
    values = dict(missing_model=tmp_path / "none.safetensors", video=videos / "a_tone.mp4", ckpt=ckpt, st=st,
                  other_config=other, short_labels=tmp_path / "short.txt", empty_dir=tmp_path / "empty")
    rc = main(["predict", *[a.format(**values) for a in argv], "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    import re
    assert re.search(match, err), err


def test_csv_of_paths(capsys, videos, scenic_model, tmp_path):
    _, _, st = scenic_model
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,labels\n{videos / 'b_high.mkv'},1\n{videos / 'a_tone.mp4'},0;2\n")
    _, rows, _ = predictions(capsys, [str(st), str(listing)])
    assert [r["file"] for r in rows] == [str(videos / "b_high.mkv"), str(videos / "a_tone.mp4")]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_embed_writes_one_row_per_file(capsys, videos, scenic_model, tmp_path, suffix):
    _, _, st = scenic_model
    out = tmp_path / f"emb{suffix}"
    (tmp_path / "bad.mp4").write_text("no")
    rc = main(["embed", str(st), str(videos), str(tmp_path / "bad.mp4"), "--out", str(out), "--bottleneck",
               "--no-progress"])
    assert rc == 1 and "skipped" in capsys.readouterr().err  # one bad file, reported
    if suffix == ".npz":
        d = np.load(out)
        arrays, files, skipped = {k: d[k] for k in d.files}, list(d["files"]), list(d["skipped"])
    else:
        from safetensors import safe_open
        with safe_open(str(out), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            files, skipped = json.loads(f.metadata()["files"]), json.loads(f.metadata()["skipped"])
    assert files == sorted(str(p) for p in videos.iterdir()) and skipped == [str(tmp_path / "bad.mp4")]
    model = mbt_fast.MBT.from_pretrained(st)
    for i, f in enumerate(files):
        clip = inference.decode_clip(f, model.cfg)
        with torch.no_grad():
            emb = model.embed(**clip.inputs, missing="drop", bottleneck=True)
        for k in ("rgb", "mean", "bottleneck"):
            np.testing.assert_allclose(arrays[k][i], emb[k][0].numpy(), rtol=1e-5, atol=1e-6)
        assert bool(arrays["present_spectrogram"][i]) == ("spectrogram" in clip.present)
        if "spectrogram" in clip.present:
            np.testing.assert_allclose(arrays["spectrogram"][i], emb["spectrogram"][0].numpy(), rtol=1e-5, atol=1e-6)
        else:
            assert np.isnan(arrays["spectrogram"][i]).all()
    assert arrays["bottleneck"].shape == (3, CFG.num_bottleneck_tokens, 32)
    assert main(["embed", str(st), str(videos), "--out", str(out)]) == 2  # exists: refused without --overwrite
