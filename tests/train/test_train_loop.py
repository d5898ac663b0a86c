"""The trainer: exact resume, checkpoint on a signal, pickle-free checkpoints, video folders, the CLI."""
import json
import signal

import pytest
import torch
from safetensors import safe_open

import mbt_fast
from mbt_fast.cli import main as cli_main
from mbt_fast.data import SyntheticAVDataset, VideoDataset
from mbt_fast.data.testing import write_clip, write_corrupt
from mbt_fast.train import TrainConfig, load_model_from_checkpoint, read_checkpoint, train

CFG = mbt_fast.MBTConfig.preset("tiny", num_classes=8, stochastic_droplayer_rate=0.3, dropout_rate=0.1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _tc(out, **kw):
    base = dict(out_dir=str(out), steps=6, batch_size=8, ckpt_every=0, progress=False, plot=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_reproduces_the_straight_run_exactly(tmp_path, optimizer):
    # 20 examples / batch 8 = 2 batches per epoch: the runs cross epoch boundaries; dropout, stochastic
    # depth, mixup and the sampler all draw random numbers that the checkpoint must carry over
    data = SyntheticAVDataset(20, seed=1)
    kw = dict(optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 3e-3, weight_decay=0.01, mixup_alpha=0.5)
    straight = train(_tc(tmp_path / "a", **kw), CFG, data)
    assert straight["step"] == 6
    paused = train(_tc(tmp_path / "b", stop_after=3, **kw), CFG, data)
    assert paused["paused"] and paused["step"] == 3
    resumed = train(_tc(tmp_path / "b", **kw), CFG, data, resume=True)
    assert resumed["step"] == 6
    steps_a, losses_a = _losses(tmp_path / "a")
    steps_b, losses_b = _losses(tmp_path / "b")
    assert steps_a == steps_b == [1, 2, 3, 4, 5, 6]
    assert losses_a == losses_b, f"straight {losses_a} vs paused+resumed {losses_b}"
    wa, wb = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_signal_checkpoints_and_resume_continues(tmp_path):
    data = SyntheticAVDataset(40, seed=2)
    straight = train(_tc(tmp_path / "a"), CFG, data)

    def raise_term(step, rec):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    stopped = train(_tc(tmp_path / "b", ckpt_every=1), CFG, data, on_step=raise_term)
    assert stopped["interrupted"] and stopped["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    # a stale line after the checkpoint (a crash between log and checkpoint) is dropped on resume
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    train(_tc(tmp_path / "b"), CFG, data, resume=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert straight["model"] is not None


def test_checkpoint_is_safetensors_plus_json(tmp_path):
    res = train(_tc(tmp_path, steps=2, optimizer="adamw", lr=1e-3), CFG, SyntheticAVDataset(16))
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["mbt_fast_trainer"])
    assert any(k.startswith("model.") for k in keys) and "rng.torch" in keys and "rng.numpy" in keys
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in keys)  # optimizer tensors too
    assert meta["trainer"]["step"] == 2 and meta["trainer"]["model_config"]["num_classes"] == 8
    assert meta["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    model = load_model_from_checkpoint(path)
    ref = res["model"].eval()
    x = {"rgb": torch.randn(2, 3, 8, 32, 32), "spectrogram": torch.randn(2, 64, 32)}
    assert torch.equal(model(**x), ref(**x))
    exported = mbt_fast.MBT.from_pretrained(tmp_path / "model.safetensors")
    assert torch.equal(exported(**x), ref(**x))
    tensors, meta2 = read_checkpoint(path)
    assert meta2 == meta and set(tensors) == set(keys)
    assert (tmp_path / "curves.png").exists() is False  # plot=False
    not_ckpt = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="not an mbt_fast training checkpoint"):
        read_checkpoint(not_ckpt)


def test_trains_on_a_video_folder_with_bad_files(tmp_path):
    root = tmp_path / "videos"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    write_clip(root / "a" / "1.mp4", seconds=1.0)
    write_clip(root / "a" / "2.mkv", seconds=1.0, tone_hz=500.0)
    write_clip(root / "b" / "3.mp4", seconds=1.0, audio=False)
    write_clip(root / "b" / "4.webm", seconds=1.0)
    write_corrupt(root / "b" / "5.mp4")
    cfg = mbt_fast.MBTConfig.preset("tiny")
    kw = dict(rgb_shape=cfg.rgb_shape, spectrogram_shape=cfg.spectrogram_shape)
    train_ds = VideoDataset.from_folder(root, mode="train", **kw)
    val_ds = VideoDataset.from_folder(root, mode="test", num_clips=2, **kw)
    res = train(_tc(tmp_path / "run", steps=3, batch_size=2, plot=True), cfg.__class__.preset("tiny", num_classes=2),
                train_ds, val_ds)
    assert res["step"] == 3 and res["num_skipped"] >= 1
    assert res["eval"]["num_examples"] == 4 and res["eval"]["num_skipped"] == 1 and "top5" in res["eval"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    # AudioSet-style multi-label CSV -> sigmoid BCE and mAP
    csv = tmp_path / "list.csv"
    csv.write_text("path,labels\n" + "".join(f"{p},{i % 3};{(i + 1) % 3}\n"
                                             for i, p in enumerate(sorted(root.rglob("*.*")))))
    ml = VideoDataset.from_csv(csv, num_classes=3, mode="eval", **kw)
    res = train(_tc(tmp_path / "ml", steps=2, batch_size=2), cfg.__class__.preset("tiny", num_classes=3), ml, ml)
    assert "mAP" in res["eval"] and 0 <= res["eval"]["mAP"] <= 1


def test_cli_train_writes_metrics_and_resumes(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--preset", "tiny", "--data", "synthetic", "--steps", "4", "--ckpt-every", "2", "--out", str(out),
            "--batch-size", "8", "--train-size", "32", "--val-size", "16", "--no-progress", "--threads", "1",
            "--backend", "torch"]
    assert cli_main(args + ["--stop-after", "2"]) == 0
    assert _losses(out)[0] == [1, 2]
    assert cli_main(args + ["--resume"]) == 0
    steps, losses = _losses(out)
    assert steps == [1, 2, 3, 4] and all(isinstance(x, float) for x in losses)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm"} <= set(rec)
    assert "done: 4 steps" in capsys.readouterr().out
    assert cli_main(["train", "--out", str(tmp_path / "x"), "--data", "csv"]) == 2  # clear error, no traceback


def test_compiled_training_matches_eager(tmp_path):
    """--compile (Inductor, fullgraph) trains the same run as eager up to fp32 rounding: without dropout
    and stochastic depth, whose random draws Inductor makes with its own generator."""
    cfg = mbt_fast.MBTConfig.preset("tiny", num_classes=8)
    data = SyntheticAVDataset(16)
    eager = train(_tc(tmp_path / "eager", steps=3, mixup_alpha=0.0), cfg, data)
    compiled = train(_tc(tmp_path / "compiled", steps=3, mixup_alpha=0.0, compile=True), cfg, data)
    assert eager["step"] == compiled["step"] == 3
    (_, a), (_, b) = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4 * max(1.0, max(map(abs, a))), f"eager {a} vs compiled {b}"
