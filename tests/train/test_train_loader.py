"""The training DataLoader: workers (auto count, exact resume), data_s in every step row, the data-wait warning."""
import json
import logging
import os
import time

import pytest
import torch

import mbt_fast
from mbt_fast.data import SyntheticAVDataset
from mbt_fast.train import TrainConfig, train
from mbt_fast.train import trainer as trainer_mod

CFG = mbt_fast.MBTConfig.preset("tiny", num_classes=8, stochastic_droplayer_rate=0.3, dropout_rate=0.1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _tc(out, **kw):
    base = dict(out_dir=str(out), steps=6, batch_size=8, ckpt_every=0, progress=False, plot=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


class SlowDataset(torch.utils.data.Dataset):
    """Wraps a dataset; every item costs ``delay`` seconds more (a loader that cannot keep up)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay, self.multi_label = inner, delay, inner.multi_label

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, key):
        time.sleep(self.delay)
        return self.inner[key]


def test_workers_resume_exactly_and_match_the_main_process(tmp_path):
    # 20 examples / batch 8: the runs cross an epoch boundary (persistent workers, a new sampler position)
    data = SyntheticAVDataset(20, seed=1)
    straight = train(_tc(tmp_path / "w0", num_workers=0), CFG, data)
    paused = train(_tc(tmp_path / "w2", num_workers=2, stop_after=3), CFG, data)
    assert paused["paused"] and paused["step"] == 3
    resumed = train(_tc(tmp_path / "w2", num_workers=2), CFG, data, resume=True)
    assert resumed["step"] == 6
    a, b = _rows(tmp_path / "w0"), _rows(tmp_path / "w2")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b], "2 workers + resume differ from 0 workers straight"
    wa, wb = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_step_row_records_data_and_step_seconds(tmp_path):
    train(_tc(tmp_path / "run", steps=4, num_workers=0), CFG, SyntheticAVDataset(16))
    rows = _rows(tmp_path / "run")
    assert len(rows) == 4
    for r in rows:
        assert r["data_s"] >= 0 and r["step_s"] > 0, r


def test_slow_data_warns_once_naming_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer_mod, "DATA_WAIT_WINDOW", 4)
    slow = SlowDataset(SyntheticAVDataset(64), delay=0.05)  # 0.4 s per batch of 8: far above a tiny step
    with caplog.at_level(logging.WARNING, logger="mbt_fast.train.trainer"):
        train(_tc(tmp_path / "slow", steps=7, num_workers=0), CFG, slow)
    msgs = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "--num-workers" in msgs[0] and "mbt-fast prepare" in msgs[0]
    rows = _rows(tmp_path / "slow")
    assert all(r["data_s"] >= 0.35 for r in rows), [r["data_s"] for r in rows]  # 8 items x 0.05 s each


def test_fast_data_does_not_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer_mod, "DATA_WAIT_WINDOW", 3)
    with caplog.at_level(logging.WARNING, logger="mbt_fast.train.trainer"):
        train(_tc(tmp_path / "fast", steps=5, num_workers=0, batch_size=2), CFG, SyntheticAVDataset(16))
    assert not [r for r in caplog.records if "waited for data" in r.getMessage()]


def test_auto_workers_follow_the_affinity_mask(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert trainer_mod.resolve_num_workers("auto") == max(1, min(8, cores))
    assert trainer_mod.resolve_num_workers(0) == 0 and trainer_mod.resolve_num_workers(3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert trainer_mod.resolve_num_workers("auto") == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # 16 ranks on the node share the 64 cores
    assert trainer_mod.resolve_num_workers("auto") == 4
    with pytest.raises(ValueError, match="num_workers: expected 'auto' or an integer >= 0, got -1"):
        TrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor"):
        TrainConfig(prefetch_factor=0)


class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"rgb": torch.rand(3, 2, 8, 8, generator=g), "label": torch.zeros(4), "index": i,
                "audio_missing": False, "decode_fallback": False, "text_length": i}


def _collate_in_worker(batch):
    from mbt_fast.data import collate_skip_bad

    out = collate_skip_bad(batch)
    return out, {k: out[k].is_shared() for k in ("rgb", "label")}  # the stacked item tensors


def test_collate_stacks_into_shared_memory_in_a_worker():
    # in a worker the batch must end up in shared memory to reach the training process: stacked there
    # directly, it is not copied over once more when sent; the values are the ones stacked in process
    from mbt_fast.data import collate_skip_bad

    ds = _Items()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=_collate_in_worker)
    for k, (batch, shared) in enumerate(loader):
        assert shared == {"rgb": True, "label": True}, shared
        ref = collate_skip_bad([ds[i] for i in range(3 * k, 3 * k + 3)])
        assert not ref["rgb"].is_shared()  # in the training process: ordinary memory
        for key in ("rgb", "label", "text_length", "index"):
            assert torch.equal(batch[key], ref[key]), key


_WORKER_BATCHES = """
import resource, sys, torch
from mbt_fast.data import VideoDataset, collate_skip_bad, dataset
if sys.argv[2] == "default":
    dataset.keep_freed_memory = lambda: False
state = {}
def collate(batch):  # page faults while the worker made this batch's items
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    prev = state.get("f", f)
    collate_skip_bad(batch)
    state["f"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return f - prev, dataset._FREED_MEMORY_KEPT
ds = VideoDataset([(sys.argv[1], [0])] * 24, num_classes=1, rgb_shape=(32, 224, 224), spectrogram_shape=(800, 128))
out = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate))
faults = sorted(f for f, _ in out[2:])  # once the worker's heap has grown to a batch
print(out[-1][1] is True, faults[len(faults) // 2])
"""


def test_workers_keep_freed_memory_for_the_next_items(tmp_path):
    """A worker frees a batch's clips (19 MB each at MBT-B shapes) together after the collate; with glibc's
    defaults that memory goes back to the OS and the next batch faults in every page again."""
    import subprocess
    import sys

    from mbt_fast.data import dataset
    from mbt_fast.data.testing import write_clip

    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except ValueError:
        glibc = False
    if not glibc:
        assert dataset.keep_freed_memory() is False
        pytest.skip("malloc is not glibc's here")
    path = write_clip(tmp_path / "a.mp4", seconds=1.0, fps=25, size=(80, 48), gop=10)
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _WORKER_BATCHES, str(path), mode], capture_output=True,
                             text=True, check=True).stdout.split()
        runs[mode] = (out[0] == "True", int(out[1]))
    assert runs["keep"][0] and not runs["default"][0], runs
    assert runs["default"][1] > 4 * 4000, runs  # what it is for: ~every page of every clip, every batch
    assert runs["keep"][1] < 4 * 400, runs


def _memory_kept_in_worker(batch):
    from mbt_fast.data import dataset

    return dataset._FREED_MEMORY_KEPT


def test_video_dataset_keeps_freed_memory_in_its_workers(tmp_path):
    from mbt_fast.data import VideoDataset
    from mbt_fast.data.testing import write_clip

    path = write_clip(tmp_path / "a.mp4", seconds=1.0)
    ds = VideoDataset([(str(path), [0])] * 2, num_classes=1, rgb_shape=(4, 16, 16), spectrogram_shape=(32, 16),
                      mode="eval")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=_memory_kept_in_worker)
    kept = next(iter(loader))
    assert kept is (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
