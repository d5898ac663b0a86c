"""DDP on the CPU: torchrun with 2 gloo processes trains, rank 0 checkpoints, the checkpoint loads."""
import json
import os
import signal
import subprocess
import sys

import torch

from mbt_fast.train import load_model_from_checkpoint, read_checkpoint


def torchrun_cli(*argv, timeout: float = 240) -> str:
    """``torchrun --nproc_per_node 2 -m mbt_fast.cli ARGV`` on the CPU; asserts it succeeds, returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mbt_fast.cli", *argv]
    # own session, so a hang can be cleaned up with the workers torchrun started
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("torchrun timed out:\n" + output[-3000:]) from None
    assert proc.returncode == 0, output[-4000:]
    return output


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    torchrun_cli("train", "--preset", "tiny", "--data", "synthetic", "--steps", "3", "--batch-size", "8",
                 "--train-size", "32", "--val-size", "16", "--ckpt-every", "2", "--device", "cpu",
                 "--out", str(out), "--no-progress", "--threads", "1")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone logs
    assert all(r["examples_per_s"] > 0 for r in rows)
    tensors, meta = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["trainer"]["world_size"] == 2 and meta["trainer"]["step"] == 3
    assert "rng.torch.rank0" in tensors and "rng.torch.rank1" in tensors
    model = load_model_from_checkpoint(out / "checkpoint.safetensors")
    x = {"rgb": torch.zeros(1, 3, 8, 32, 32), "spectrogram": torch.zeros(1, 64, 32)}
    assert torch.isfinite(model(**x)).all()
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[-1])["num_examples"] == 16  # gathered shards
