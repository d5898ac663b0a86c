"""``mbt-fast train`` on the command line: range-checked flags, owned run folders, resume checks, loud
failures (exit 2 with the message on stderr, no traceback), exact resume after SIGKILL."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from mbt_fast.cli import main as cli_main
from mbt_fast.data.testing import write_corrupt
from mbt_fast.train.run_dir import RunLock

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(out, *extra):
    return ["train", "--preset", "tiny", "--data", "synthetic", "--steps", "4", "--batch-size", "8", "--train-size",
            "24", "--val-size", "8", "--ckpt-every", "2", "--no-progress", "--threads", "1", "--out", str(out), *extra]


def _steps_losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _error(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and return its one stderr message (no traceback)."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("mbt-fast train: ")][-1:]
    return err[err.index(line):].rstrip("\n")


@contextmanager
def _deadline(seconds):
    """Fail instead of hanging when the code under test loops forever."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- the parser range-checks every numeric flag -------------------------------------------------------
@pytest.mark.parametrize("flag, value, expected", [
    ("--steps", "0", "an integer >= 1"), ("--steps", "1.5", "an integer >= 1"),
    ("--batch-size", "0", "an integer >= 1"), ("--num-classes", "0", "an integer >= 1"),
    ("--num-test-clips", "0", "an integer >= 1"), ("--train-size", "0", "an integer >= 1"),
    ("--val-size", "-1", "an integer >= 0"), ("--num-workers", "-1", "'auto' or an integer >= 0"),
    ("--prefetch-factor", "0", "an integer >= 1"),
    ("--warmup-steps", "-1", "an integer >= 0"), ("--fusion-layer", "-1", "an integer >= 0"),
    ("--seed", "x", "an integer >= 0"), ("--ckpt-every", "-1", "an integer >= 0"),
    ("--eval-every", "-1", "an integer >= 0"), ("--stop-after", "0", "an integer >= 1"),
    ("--threads", "0", "an integer >= 1"), ("--log-every", "0", "an integer >= 1"),
    ("--max-nonfinite", "0", "an integer >= 1"),
    ("--lr", "nan", "a finite number > 0"), ("--lr", "inf", "a finite number > 0"), ("--lr", "0", "a finite number > 0"),
    ("--lr", "-0.1", "a finite number > 0"), ("--spec-std", "0", "a finite number > 0"),
    ("--spec-mean", "nan", "a finite number"), ("--weight-decay", "-0.0001", "a finite number >= 0"),
    ("--grad-clip", "-1", "a finite number >= 0"), ("--mixup-alpha", "nan", "a finite number >= 0"),
    ("--label-smoothing", "1", "a number in [0, 1)"), ("--droplayer", "1.5", "a number in [0, 1)"),
])
def test_numeric_flags_are_range_checked(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as e:
        cli_main(_args(tmp_path / "run", flag, value))
    assert e.value.code == 2
    assert f"mbt-fast train: error: argument {flag}: expected {expected}, got {value!r}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # rejected before anything is written


def test_resume_and_overwrite_are_exclusive_and_warmup_fits_the_steps(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(_args(tmp_path / "run", "--resume", "--overwrite"))
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
    assert _error(capsys, _args(tmp_path / "run", "--warmup-steps", "9")) == \
        "mbt-fast train: --warmup-steps 9 exceeds --steps 4"


# ---- the run folder belongs to one run -----------------------------------------------------------------
def test_cli_refuses_another_run_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_args(out)) == 0
    old = (out / "metrics.jsonl").read_bytes()
    assert _error(capsys, _args(out)) == (
        f"mbt-fast train: --out {out} holds another run (checkpoint.safetensors, model.safetensors, metrics.jsonl, "
        f"eval.jsonl); pass --resume to continue it or --overwrite to move it aside to run.old-<timestamp>")
    assert (out / "metrics.jsonl").read_bytes() == old
    assert cli_main(_args(out, "--overwrite", "--seed", "1")) == 0
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_bytes() == old and (out / "metrics.jsonl").read_bytes() != old


def test_cli_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert _error(capsys, _args(out, "--resume")) == (
        f"mbt-fast train: --resume: no checkpoint.safetensors in {out} (it holds no run); start a new run without "
        f"--resume (with --overwrite to move an old run aside)")
    assert not (out / "metrics.jsonl").exists()


def test_cli_names_the_process_holding_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        msg = _error(capsys, _args(out))
    assert msg.startswith(f"mbt-fast train: run folder {out} is in use by another process (pid {os.getpid()} on host "
                          f"{socket.gethostname()}, since ")
    assert msg.endswith("); wait for it to finish or stop it, or choose another --out")


# ---- resume checks --------------------------------------------------------------------------------------
def test_cli_resume_refuses_changed_arguments(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_args(out, "--stop-after", "2")) == 0
    msg = _error(capsys, _args(out, "--resume", "--lr", "0.1", "--batch-size", "4", "--fusion-layer", "1",
                               "--train-size", "32", "--label-smoothing", "0.1", "--preset", "tiny"))
    assert msg == (
        f"mbt-fast train: --resume: the checkpoint {out / 'checkpoint.safetensors'} (step 2) was made with other "
        "arguments, and these changes would alter the run:\n"
        "  batch_size: 8 -> 4\n"
        "  lr: 0.5 -> 0.1\n"
        "  label_smoothing: 0.3 -> 0.1\n"
        "  train_size: 24 -> 32\n"
        "  model_config.fusion_layer: 2 -> 1\n"
        "  len(train_dataset): 24 -> 32\n"
        "resume with the original arguments, or start a new run (another --out, or --overwrite)")
    # the data source itself
    msg = _error(capsys, _args(out, "--resume", "--data", "folder", "--data-dir", str(tmp_path)))
    assert "  data: 'synthetic' -> 'folder'\n" in msg and f"  data_dir: None -> {str(tmp_path)!r}\n" in msg


def test_cli_resume_extends_the_run_and_a_finished_run_is_a_no_op(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert cli_main(_args(out, "--stop-after", "2")) == 0
    assert cli_main(_args(out, "--resume", "--steps", "6", "--log-every", "2", "--num-workers", "0")) == 0
    assert ("--resume: applying changed arguments that are safe to change: steps: 4 -> 6 (the warmup + cosine "
            "schedule now spans 6 steps); num_workers: 'auto' -> 0; log_every: 1 -> 2") in caplog.messages
    assert _steps_losses(out)[0] == [1, 2, 4, 6]
    assert "done: 6 steps" in capsys.readouterr().out
    evals = (out / "eval.jsonl").read_text()
    assert cli_main(_args(out, "--resume", "--steps", "6", "--log-every", "2")) == 0
    assert capsys.readouterr().out.startswith(
        f"already finished at step 6; nothing to do (checkpoint {out / 'checkpoint.safetensors'}; a larger --steps "
        f"extends the run)\n")
    assert (out / "eval.jsonl").read_text() == evals and len(evals.splitlines()) == 1  # no duplicate eval line


# ---- failures are loud ----------------------------------------------------------------------------------
def test_cli_divergence_stops_with_the_step_and_causes(tmp_path, capsys):
    out = tmp_path / "run"
    msg = _error(capsys, _args(out, "--steps", "20", "--lr", "1e30", "--max-nonfinite", "2"))
    assert msg.startswith("mbt-fast train: training stopped at step ")
    assert ("the loss or the gradient was not finite for 2 consecutive steps (--max-nonfinite 2; last loss " in msg
            and "Likely causes: the learning rate is too high (lr 1e+30, 1.25e+29 after batch scaling)" in msg)
    steps, losses = _steps_losses(out)
    assert steps and all(x == x and abs(x) != float("inf") for x in losses)  # only finite steps were logged


def test_cli_a_csv_of_unreadable_files_stops_with_the_reasons(tmp_path, capsys):
    paths = [write_corrupt(tmp_path / f"bad{i}.mp4") for i in range(3)]
    csv = tmp_path / "train.csv"
    csv.write_text("".join(f"{p},0\n" for p in paths))
    argv = ["train", "--preset", "tiny", "--csv", str(csv), "--num-classes", "2", "--steps", "3", "--batch-size",
            "2", "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")]
    with _deadline(120):
        msg = _error(capsys, argv)
    assert msg.startswith("mbt-fast train: epoch 0 gave no batch to train on: every batch was unreadable (2 examples "
                          "skipped, of 3 in the training set); the first reasons: ")  # batch 2: one batch per epoch
    assert sum(f"{p}: InvalidDataError: " in msg for p in paths) == 2


# ---- exact resume after a SIGKILL -------------------------------------------------------------------------
def test_cli_resume_after_sigkill_is_exact(tmp_path):
    # 24 examples / batch 8 = 3 batches an epoch and a checkpoint every 3 steps: the resume starts at an
    # epoch's last batch (which once failed with "gives no batch")
    argv = ["train", "--preset", "tiny", "--data", "synthetic", "--steps", "40", "--batch-size", "8", "--train-size",
            "24", "--val-size", "0", "--ckpt-every", "3", "--no-progress", "--threads", "1"]
    assert cli_main(argv + ["--out", str(tmp_path / "a")]) == 0
    out = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mbt_fast.cli", *argv, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 7:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was on disk is what resume gets
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert cli_main(argv + ["--out", str(out), "--resume"]) == 0
    assert _steps_losses(tmp_path / "a") == _steps_losses(out)  # no lost step, no duplicate line
    assert not list(out.glob("*.tmp*"))


@pytest.mark.parametrize("argv, flag, expected", [
    (["demo", "--steps", "0"], "--steps", "an integer >= 1"),
    (["demo", "--lr", "nan"], "--lr", "a finite number > 0"),
    (["demo", "--val-size", "-3"], "--val-size", "an integer >= 1"),
    (["demo", "--seed", "-1"], "--seed", "an integer >= 0"),
])
def test_demo_flags_are_range_checked(capsys, argv, flag, expected):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert f"argument {flag}: expected {expected}, got {argv[-1]!r}" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("bench_attention", ["--reps", "0"]), ("bench_block", ["--batch", "0"]),
    ("bench_train", ["--max-seconds", "-1"]), ("bench_train", ["--warmup", "-2"]),
])
def test_bench_flags_are_range_checked(capsys, script, argv):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    module = importlib.import_module(f"bench.{script}")
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    assert f"argument {argv[0]}: expected" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(2000)], ids=["empty", "truncated", "random"])
def test_cli_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(content)
    message = _error(capsys, _args(out, "--resume"))
    assert message.startswith(f"mbt-fast train: {out / 'checkpoint.safetensors'}: not a readable safetensors file "
                              f"(truncated, empty or another format?)"), message
    assert (out / "checkpoint.safetensors").read_bytes() == content  # nothing overwritten


def test_train_a_three_modality_model_and_resume_it(tmp_path):
    """``--preset tiny_trimodal``: rgb, spectrogram and optical flow on the synthetic task (16 classes, the
    flow carrying the motion bit); the saved model has the three streams and loads back; resume goes on."""
    import torch

    import mbt_fast

    out = tmp_path / "tri"
    argv = _args(out)
    argv[argv.index("tiny")] = "tiny_trimodal"
    assert cli_main(argv) == 0
    model = mbt_fast.MBT.from_pretrained(out / "model.safetensors")
    assert model.cfg.modality_fusion == ("spectrogram", "rgb", "flow") and model.cfg.num_classes == 16
    assert "embed_flow.weight" in model.state_dict() and "blocks.3.flow.mlp.fc1.weight" in model.state_dict()
    with torch.no_grad():
        logits = model(rgb=torch.zeros(1, 3, 8, 32, 32), spectrogram=torch.zeros(1, 64, 32), flow=torch.zeros(1, 2, 8, 32, 32))
    assert logits.shape == (1, 16) and torch.isfinite(logits).all()
    argv[argv.index("4")] = "6"
    assert cli_main([*argv, "--resume"]) == 0
    assert _steps_losses(out)[0] == list(range(1, 7))


def test_train_synthetic_refuses_a_modality_it_cannot_generate(tmp_path, capsys, monkeypatch):
    from mbt_fast import config, modalities

    class Imu(modalities.SpectrogramEmbedding):  # any tokenizer the synthetic task has no generator for
        pass

    monkeypatch.setitem(modalities._REGISTRY, "imu", Imu)
    monkeypatch.setitem(config.PRESETS, "tiny_imu", config.MBTConfig.preset(
        "tiny", modality_fusion=("rgb", "imu"), input_shapes={"rgb": (-1, 8, 32, 32, 3), "imu": (-1, 64, 32, 3)}))
    argv = _args(tmp_path / "imu")
    argv[argv.index("tiny")] = "tiny_imu"
    assert "modality 'imu' (Imu) has no synthetic generator" in _error(capsys, argv)


def test_train_and_predict_with_flow_from_sidecar_files(tmp_path, capsys):
    """Videos with their optical flow beside them (``<stem>.flow.npy``): train a three-modality model on
    them, predict from a video with its flow, and name the flow file when it is missing."""
    import numpy as np

    from mbt_fast.data.testing import write_clip

    root = tmp_path / "videos"
    for c in ("a", "b"):
        for i in range(2):
            (root / c).mkdir(parents=True, exist_ok=True)
            path = write_clip(root / c / f"{c}{i}.mp4", seconds=1.5, fps=10, size=(64, 48))
            flow = np.random.default_rng(i).standard_normal((15, 48, 64, 2)).astype(np.float16)
            np.save(path.with_suffix(".flow.npy"), flow)
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny_trimodal", "--data-dir", str(root), "--val-dir", str(root), "--steps", "2",
            "--batch-size", "2", "--no-progress", "--threads", "1", "--num-workers", "0", "--out", str(out)]
    assert cli_main(argv) == 0
    assert cli_main(["predict", str(out / "model.safetensors"), str(root / "a" / "a0.mp4"), "--json",
                     "--no-progress"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["file"].endswith("a0.mp4") and len(row["top"]) >= 1
    (root / "b" / "b1.flow.npy").unlink()
    assert cli_main(["predict", str(out / "model.safetensors"), str(root / "b" / "b1.mp4"), "--json",
                     "--no-progress"]) == 1
    assert f"sidecar file {root / 'b' / 'b1.flow.npy'} does not exist" in capsys.readouterr().err


def test_train_and_predict_with_ragged_feature_files(tmp_path, capsys):
    """rgb + a ``tokens`` feature sequence read from ``<stem>.tokens.npy`` files of unequal length: the
    dataset pads them and reports their lengths, training and predict pass them to the model as
    ``lengths``, and predict answers exactly as the model does with those lengths."""
    import numpy as np
    import torch

    import mbt_fast
    from mbt_fast import inference
    from mbt_fast.data import VideoDataset
    from mbt_fast.data.dataset import video_shapes
    from mbt_fast.data.testing import write_clip
    from mbt_fast.train.trainer import TrainConfig, train

    cfg = mbt_fast.MBTConfig.preset("tiny", modality_fusion=("rgb", "tokens"), num_classes=2,
                                    input_shapes={"rgb": (-1, 4, 32, 32, 3), "tokens": (-1, 6, 5)})
    root = tmp_path / "videos"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            path = write_clip(root / name / f"{name}{i}.mp4", seconds=1.0, fps=10, size=(48, 40))
            rows = 2 + 3 * i + c  # 2 to 6 rows of the 6 the model takes
            np.save(path.with_suffix(".tokens.npy"), np.random.default_rng(i + 2 * c).standard_normal((rows, 5)))
    ds = VideoDataset.from_folder(root, mode="train", modalities=cfg.modality_fusion, **video_shapes(cfg))
    assert [ds[(j, 0)]["tokens_length"] for j in range(4)] == [2, 5, 3, 6]
    tc = TrainConfig(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, optimizer="adamw", lr=1e-3, device="cpu",
                     num_workers=0, ckpt_every=0, progress=False, plot=False, mixup_alpha=0.5)
    train(tc, cfg, ds, None)
    model_path = tmp_path / "run" / "model.safetensors"
    assert cli_main(["predict", str(model_path), str(root / "a" / "a0.mp4"), "--json", "--no-progress",
                     "--top-k", "2"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    model = mbt_fast.MBT.from_pretrained(model_path)
    clip = inference.decode_clip(root / "a" / "a0.mp4", model.cfg)
    assert clip.lengths["tokens"].tolist() == [2]
    with torch.no_grad():
        expected = model(**clip.inputs, lengths=clip.lengths).softmax(-1)[0]
        unmasked = model(**clip.inputs).softmax(-1)[0]
    scores = [t["score"] for t in row["top"]]
    assert max(abs(s - e) for s, e in zip(sorted(scores, reverse=True), expected.sort(descending=True).values.tolist())) < 1e-5
    assert not torch.allclose(expected, unmasked)  # the padding was masked, not attended to

    # multi-clip evaluation: each file's length goes with each of its clips
    from mbt_fast.train.trainer import evaluate

    test = VideoDataset.from_folder(root, mode="test", num_clips=2, modalities=cfg.modality_fusion, **video_shapes(cfg))
    res = evaluate(model, test, multi_label=False, batch_size=4)
    with torch.no_grad():
        items = [test[j] for j in range(len(test))]
        manual = torch.stack([model(rgb=it["rgb"], tokens=it["tokens"],
                                    lengths={"tokens": torch.full((2,), it["tokens_length"])}).mean(0) for it in items])
    labels = torch.stack([it["label"] for it in items])
    from mbt_fast.train.losses import classification_loss

    assert abs(res["loss"] - float(classification_loss(manual, labels, False))) < 1e-5, res
