"""Reliability of the training loop: owned run folders (lock, no overwrite, resume checks), exact resume
with repaired logs, checkpoint writes that survive a second signal, loud failures (non-finite steps)."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import mbt_fast
from mbt_fast.data import SyntheticAVDataset
from mbt_fast.train import TrainConfig, read_checkpoint, save_checkpoint, train
from mbt_fast.train.checkpoint import model_state
from mbt_fast.train.run_dir import RunFolderError, RunFolderLocked, RunLock, claim_run_dir, move_aside
from mbt_fast.train.trainer import NonFiniteError

CFG = mbt_fast.MBTConfig.preset("tiny", num_classes=8, stochastic_droplayer_rate=0.3, dropout_rate=0.1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tc(out, **kw):
    base = dict(out_dir=str(out), steps=4, batch_size=8, ckpt_every=0, progress=False, plot=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _steps_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


# ---- the folder belongs to one run ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "eval.jsonl"])
def test_a_fresh_run_refuses_a_folder_with_another_run(tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("old")
    with pytest.raises(RunFolderError) as e:
        train(_tc(out), CFG, SyntheticAVDataset(16))
    assert str(e.value) == (f"--out {out} holds another run ({name}); pass --resume to continue it or "
                            f"--overwrite to move it aside to run.old-<timestamp>")
    assert (out / name).read_text() == "old"


def test_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    train(_tc(out, steps=2), CFG, SyntheticAVDataset(16))
    old_metrics = (out / "metrics.jsonl").read_bytes()
    (out / "notes.txt").write_text("mine")
    res = train(_tc(out, steps=3), CFG, SyntheticAVDataset(16), overwrite=True)
    assert res["step"] == 3 and _steps_losses(out)[0] == [1, 2, 3]
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").read_bytes() == old_metrics  # nothing lost
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl", "model.safetensors",
                                                       "notes.txt"]
    assert read_checkpoint(aside / "checkpoint.safetensors")[1]["trainer"]["step"] == 2
    # a second move in the same second gets its own folder
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a").write_text("1")
    first = move_aside(tmp_path / "x")
    (tmp_path / "x" / "a").write_text("2")
    second = move_aside(tmp_path / "x")
    assert first != second and (first / "a").read_text() == "1" and (second / "a").read_text() == "2"


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(RunFolderError, match="--resume and --overwrite exclude each other"):
        train(_tc(tmp_path), CFG, SyntheticAVDataset(16), resume=True, overwrite=True)


def test_a_locked_folder_names_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = f"pid {os.getpid()} on host {socket.gethostname()}, since "
    with RunLock(out):
        with pytest.raises(RunFolderLocked) as e:
            train(_tc(out), CFG, SyntheticAVDataset(16))
        msg = str(e.value)
        assert msg.startswith(f"run folder {out} is in use by another process ({holder}")
        assert msg.endswith("); wait for it to finish or stop it, or choose another --out")
    # released: the folder can be claimed again
    claim_run_dir(out).release()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; from mbt_fast.train.run_dir import RunLock; "
            f"lock = RunLock({str(out)!r}); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderLocked, match=f"in use by another process \\(pid {proc.pid} on host "):
            claim_run_dir(out)
    finally:
        proc.kill()  # SIGKILL: the kernel releases the flock, no stale lock remains
        proc.wait()
    claim_run_dir(out).release()


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(RunFolderError) as e:
        train(_tc(tmp_path / "empty"), CFG, SyntheticAVDataset(16), resume=True)
    assert str(e.value) == (f"--resume: no checkpoint.safetensors in {tmp_path / 'empty'} (it holds no run); start a "
                            f"new run without --resume (with --overwrite to move an old run aside)")
    out = tmp_path / "logs_only"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(RunFolderError, match=r"\(it holds metrics.jsonl but no checkpoint\)"):
        train(_tc(out), CFG, SyntheticAVDataset(16), resume=True)
    assert not (out / "checkpoint.safetensors").exists()  # not a fresh start


# ---- resume checks ---------------------------------------------------------------------------------------
def test_resume_refuses_changes_that_alter_the_run(tmp_path):
    out = tmp_path / "run"
    data = SyntheticAVDataset(24, seed=1)
    train(_tc(out, stop_after=2, run_args={"data": "synthetic"}), CFG, data)
    changed = _tc(out, steps=1, lr=0.1, batch_size=4, seed=4, run_args={"data": "other"})
    cfg = mbt_fast.MBTConfig.preset("tiny", num_classes=8, stochastic_droplayer_rate=0.3, dropout_rate=0.1,
                                    fusion_layer=1)
    with pytest.raises(RunFolderError) as e:
        train(changed, cfg, SyntheticAVDataset(20, seed=1), resume=True)
    assert str(e.value) == (
        f"--resume: the checkpoint {out / 'checkpoint.safetensors'} (step 2) was made with other arguments, and these "
        "changes would alter the run:\n"
        "  steps: 4 -> 1 (below the checkpoint's step 2)\n"
        "  batch_size: 8 -> 4\n"
        "  lr: 0.5 -> 0.1\n"
        "  seed: 3 -> 4\n"
        "  data: 'synthetic' -> 'other'\n"
        "  model_config.fusion_layer: 2 -> 1\n"
        "  len(train_dataset): 24 -> 20\n"
        "resume with the original arguments, or start a new run (another --out, or --overwrite)")
    assert _steps_losses(out)[0] == [1, 2]  # the refused resume touched nothing


def test_resume_applies_safe_changes_and_says_so(tmp_path, caplog):
    out = tmp_path / "run"
    data = SyntheticAVDataset(24, seed=1)
    train(_tc(out, stop_after=2), CFG, data)
    with caplog.at_level(logging.WARNING, logger="mbt_fast.train.trainer"):
        res = train(_tc(out, steps=6, log_every=2, max_nonfinite=5), CFG, data, resume=True)
    assert res["step"] == 6
    assert ("--resume: applying changed arguments that are safe to change: steps: 4 -> 6 (the warmup + cosine "
            "schedule now spans 6 steps); log_every: 1 -> 2; max_nonfinite: 3 -> 5") in caplog.messages
    assert _steps_losses(out)[0] == [1, 2, 4, 6]
    assert read_checkpoint(out / "checkpoint.safetensors")[1]["trainer"]["train_config"]["steps"] == 6


def test_a_finished_run_resumes_to_a_no_op(tmp_path):
    out = tmp_path / "run"
    data, val = SyntheticAVDataset(16, seed=1), SyntheticAVDataset(8, seed=1, split="val")
    first = train(_tc(out, steps=2), CFG, data, val)
    files = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "eval.jsonl", "model.safetensors",
                                                          "checkpoint.safetensors")}
    again = train(_tc(out, steps=2), CFG, data, val, resume=True)
    assert again["already_done"] and again["step"] == 2 and again["eval"] == first["eval"]
    assert {name: (out / name).read_bytes() for name in files} == files  # no duplicate eval line, nothing rewritten
    assert len((out / "eval.jsonl").read_text().splitlines()) == 1


def test_a_finished_run_missing_its_final_eval_gets_it_once(tmp_path):
    out = tmp_path / "run"
    data, val = SyntheticAVDataset(16, seed=1), SyntheticAVDataset(8, seed=1, split="val")
    train(_tc(out, steps=2), CFG, data, val)
    (out / "eval.jsonl").unlink()  # as if killed after the final checkpoint, before the eval
    res = train(_tc(out, steps=2), CFG, data, val, resume=True)
    assert not res["already_done"] and res["eval"]["step"] == 2
    assert len((out / "eval.jsonl").read_text().splitlines()) == 1


def test_resume_repairs_a_torn_log_and_stays_exact(tmp_path, caplog):
    data = SyntheticAVDataset(20, seed=2)
    train(_tc(tmp_path / "a", steps=5), CFG, data)
    out = tmp_path / "b"
    train(_tc(out, steps=5, stop_after=3), CFG, data)
    with open(out / "metrics.jsonl", "a") as f:  # a line logged after the checkpoint, then a crash mid-line
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    (out / "checkpoint.safetensors.tmp4242").write_bytes(b"half a checkpoint")
    (out / "model.safetensors.tmp").write_bytes(b"half a model")
    with caplog.at_level(logging.WARNING, logger="mbt_fast.train.run_dir"):
        train(_tc(out, steps=5), CFG, data, resume=True)
    assert (f"{out / 'metrics.jsonl'}: dropped a torn last line (15 characters), left by a crash mid-write"
            in caplog.messages)
    assert (f"removed temporary files of an interrupted write in {out}: checkpoint.safetensors.tmp4242, "
            f"model.safetensors.tmp") in caplog.messages
    assert not list(out.glob("*.tmp*"))
    assert _steps_losses(tmp_path / "a") == _steps_losses(out)


def test_a_bad_line_inside_a_log_is_an_error_naming_the_line(tmp_path):
    out = tmp_path / "run"
    data = SyntheticAVDataset(16, seed=2)
    train(_tc(out, stop_after=2), CFG, data)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError) as e:
        train(_tc(out), CFG, data, resume=True)
    assert str(e.value) == f"{out / 'metrics.jsonl'}:2: not a JSON line ('not json'); fix or remove the line"


# ---- checkpoint writes and signals --------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Python's own Ctrl-C handler for every test here: a shell that starts a job in the background
    starts it with SIGINT ignored, and the code under test (rightly) keeps an inherited SIG_IGN."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _signal_during_write(monkeypatch, sig, only_once=True):
    real = safetensors.torch.save_file
    fired = []

    def save_then_signal(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if not (only_once and fired):
            fired.append(filename)
            signal.raise_signal(sig)  # arrives between the write and the rename

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_signal)
    return fired


def test_a_signal_during_the_checkpoint_write_waits_for_the_rename(tmp_path, monkeypatch):
    model = mbt_fast.MBT(CFG)
    _signal_during_write(monkeypatch, signal.SIGINT)
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(KeyboardInterrupt):  # delivered, but only once the checkpoint is complete
        save_checkpoint(path, model, None, {"step": 7})
    tensors, meta = read_checkpoint(path)
    assert meta["trainer"] == {"step": 7}
    assert all(torch.equal(model_state(tensors)[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temporary left


def test_a_second_ctrl_c_during_the_checkpoint_loses_nothing(tmp_path, monkeypatch):
    data = SyntheticAVDataset(24, seed=4)
    train(_tc(tmp_path / "a", steps=5), CFG, data)

    def sigterm_at_2(step, rec):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # first signal: checkpoint after this step

    out = tmp_path / "b"
    with monkeypatch.context() as m:
        fired = _signal_during_write(m, signal.SIGINT)  # the impatient second Ctrl-C, mid-write
        with pytest.raises(KeyboardInterrupt):
            train(_tc(out, steps=5), CFG, data, on_step=sigterm_at_2)
    assert fired and fired[0].startswith(str(out / "checkpoint.safetensors.tmp"))
    assert read_checkpoint(out / "checkpoint.safetensors")[1]["trainer"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    train(_tc(out, steps=5), CFG, data, resume=True)
    assert _steps_losses(tmp_path / "a") == _steps_losses(out)  # no lost step, no duplicate line


# ---- failures are loud ---------------------------------------------------------------------------------
class NaNAfter(torch.utils.data.Dataset):
    """``SyntheticAVDataset`` whose spectrogram turns NaN for the items fetched in ``bad`` (call order: the
    runs using it load in the main process, ``num_workers=0``, where there is one call order)."""

    multi_label = False

    def __init__(self, size, bad):
        self.base, self.bad, self.calls = SyntheticAVDataset(size, seed=6), bad, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        item = self.base[key]
        if self.calls in self.bad:
            item["spectrogram"] = torch.full_like(item["spectrogram"], float("nan"))
        self.calls += 1
        return item


def test_nonfinite_steps_stop_the_run_without_touching_the_parameters(tmp_path):
    model = mbt_fast.MBT(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:
        train(_tc(out, ckpt_every=1, mixup_alpha=0.0, num_workers=0), CFG, NaNAfter(40, bad=range(10**6)), model=model)
    assert str(e.value) == (
        "training stopped at step 1: the loss or the gradient was not finite for 3 consecutive steps "
        "(--max-nonfinite 3; last loss nan, grad norm nan); those steps did not update the parameters; no "
        "checkpoint was written before it. Likely causes: bad data: the last batch's spectrogram input holds "
        "NaN/Inf values (a bad normalisation such as --spec-std 0, or bad files); the learning rate is too high "
        "(lr 0.5, 0.0625 after batch scaling); a bad input normalisation (e.g. --spec-std near 0); bad data "
        "(NaN/Inf values in the inputs)")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (out / "checkpoint.safetensors").exists() and (out / "metrics.jsonl").read_text() == ""
    claim_run_dir(out, resume=False, overwrite=True).release()  # the lock was released on the error


def test_nonfinite_keeps_the_last_finite_checkpoint(tmp_path):
    model = mbt_fast.MBT(CFG)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as e:  # batches 1, 2 fine, then NaN from the 3rd batch on
        train(_tc(out, ckpt_every=1, max_nonfinite=2, num_workers=0), CFG, NaNAfter(40, bad=range(16, 10**6)), model=model)
    assert (f"training stopped at step 3: the loss or the gradient was not finite for 2 consecutive steps "
            f"(--max-nonfinite 2; last loss nan, grad norm nan); those steps did not update the parameters; the "
            f"last finite checkpoint is {out / 'checkpoint.safetensors'} (step 2). Likely causes: bad data:") \
        in str(e.value)
    tensors, meta = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["trainer"]["step"] == 2
    saved = model_state(tensors)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # skipped steps changed nothing
    assert _steps_losses(out)[0] == [1, 2]


def test_one_nonfinite_step_is_skipped_and_the_run_goes_on(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="mbt_fast.train.trainer"):
        res = train(_tc(out, steps=4, num_workers=0), CFG, NaNAfter(48, bad=range(16, 24)))  # the 3rd batch only
    assert res["step"] == 4 and res["num_nonfinite"] == 1
    assert ("step 3: loss nan, grad norm nan: not finite; the update was skipped (1 in a row, --max-nonfinite 3)"
            in caplog.messages)
    steps, losses = _steps_losses(out)
    assert steps == [1, 2, 3, 4] and all(x == x for x in losses)  # no line for the skipped step, none NaN
    meta = read_checkpoint(out / "checkpoint.safetensors")[1]["trainer"]
    assert meta["num_nonfinite"] == 1 and meta["nonfinite_streak"] == 0 and meta["batch_in_epoch"] == 5


class AllUnreadable(torch.utils.data.Dataset):
    multi_label = False

    def __init__(self, size):
        self.size, self.calls = size, 0

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        self.calls += 1
        if self.calls > 1000:  # the old behaviour looped forever: fail instead of hanging the suite
            raise RuntimeError("the trainer kept reading an epoch of unreadable items")
        index = key[0] if isinstance(key, tuple) else key
        return {"skipped": f"clip{index}.mp4: InvalidDataError: no demuxer", "index": index}


def test_an_epoch_of_unreadable_items_stops_with_the_reasons(tmp_path):
    with pytest.raises(ValueError) as e:
        train(_tc(tmp_path / "run", seed=0), CFG, AllUnreadable(16))
    msg = str(e.value)
    assert msg.startswith("epoch 0 gave no batch to train on: every batch was unreadable (16 examples skipped, of 16 "
                          "in the training set); the first reasons: clip")
    assert msg.count("InvalidDataError: no demuxer") == 3


@pytest.mark.parametrize("field, value, expected", [
    ("steps", 0, "an integer >= 1"), ("lr", float("nan"), "a finite number > 0"), ("lr", -1.0, "a finite number > 0"),
    ("batch_size", 0, "an integer >= 1"), ("max_nonfinite", 0, "an integer >= 1"),
    ("label_smoothing", 1.0, "a number in [0, 1)"), ("grad_clip", float("inf"), "a finite number >= 0"),
    ("warmup_steps", 9, "None or an integer in [0, steps=4]"), ("optimizer", "lamb", "'sgd' or 'adamw'"),
])
def test_train_config_rejects_out_of_range_values(tmp_path, field, value, expected):
    with pytest.raises(ValueError) as e:
        _tc(tmp_path, **{field: value})
    assert str(e.value) == f"TrainConfig.{field}: expected {expected}, got {value!r}"


def test_checkpoints_and_resume_never_unpickle(tmp_path, monkeypatch):
    import pickle

    data = SyntheticAVDataset(16, seed=1)
    train(_tc(tmp_path, stop_after=2), CFG, data)

    def refuse(*a, **k):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    res = train(_tc(tmp_path), CFG, data, resume=True)
    assert res["step"] == 4
    mbt_fast.MBT.from_pretrained(tmp_path / "model.safetensors")
