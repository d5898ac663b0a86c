"""Data loading per core: one ``VideoDataset`` item (train and eval, MBT-B shapes) against PyAV decoding
every video frame of the same file, in the same process, single-threaded (torch and FFmpeg).

The clip is generated with PyAV into a temporary folder (default: 10 s, 854x480, 30 fps, a keyframe
every 2 s, H.264 with B-frames + AAC 48 kHz stereo, moving texture). Reports ms and clips/s per core,
a per-stage breakdown (demux/seek, decode, resize/crop, audio + log-mel, collate: in a DataLoader worker, as in
training, with the hand-off of the batch to the training process) and the ratio
item time / full-decode time; the rounds of full decode, train and eval items are interleaved, so load
from other processes slows them alike. The same items read from a prepared cache (``mbt-fast prepare``,
made once per clip and timed apart) run in the same rounds: clips/s and speed-up over the video item. Also the resize filter against ``tf.image.resize`` (bilinear,
half-pixel centres). Everything here is a CPU measurement.

    python bench/bench_data.py                         # the default clip
    python bench/bench_data.py --sweep                 # + other resolutions / fps / GOP lengths
    python bench/bench_data.py --tiny --reps 2         # seconds, for tests
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from bench import common

STAGES = ("demux/seek", "decode", "resize/crop", "audio+log-mel", "collate")
COLUMNS = ["op", "clip", "mode", "rgb_shape", "spectrogram_shape", "median_ms", "p20_ms", "p80_ms", "reps",
           "clips_per_s", "full_decode_ms", "ratio_vs_full_decode", "frames_decoded", "frames_in_file",
           *[f"{s}_ms" for s in STAGES], "decode_path", "prepare_s", "speedup_vs_video_item", *common.ENV_COLUMNS]
SWEEP = [  # (width, height, fps, keyframe every s): other resolutions, frame rates and GOP lengths
    (640, 360, 25, 2.0), (1280, 720, 30, 2.0), (854, 480, 60, 2.0), (854, 480, 30, 0.5), (854, 480, 30, 10.0)]


def clip_name(w, h, fps, key_s, seconds):
    return f"{w}x{h}@{fps} key{key_s:g}s {seconds:g}s"


def make_clip(folder: Path, w: int, h: int, fps: int, key_s: float, seconds: float) -> Path:
    from mbt_fast.data.testing import write_clip

    path = folder / f"bench_{w}x{h}_{fps}_{key_s:g}.mp4"
    return write_clip(path, seconds=seconds, fps=fps, size=(w, h), sample_rate=48000, pattern="texture",
                      gop=max(1, int(round(key_s * fps))), preset="veryfast", crf=23)


def full_decode(path) -> int:
    """PyAV decoding every video frame, one thread, nothing else: the yardstick."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_type, s.codec_context.thread_count = "NONE", 1
        return sum(1 for _ in c.decode(s))


def _summary(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "p20_ms": common._quantile(ms, 0.2),
            "p80_ms": common._quantile(ms, 0.8), "reps": len(ms)}


class _Ready(torch.utils.data.Dataset):
    """Items made beforehand: the DataLoader worker only collates them."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate_and_send(batch) -> float:
    """Seconds a DataLoader worker spends on ``collate_skip_bad`` and on pickling the batch for the queue to
    the training process (which puts every storage not yet there into shared memory)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 -- registers torch's pickling of tensors through shared memory
    from mbt_fast.data import collate_skip_bad

    t0 = time.perf_counter()
    ForkingPickler.dumps(collate_skip_bad(batch))
    return time.perf_counter() - t0


def worker_collate_ms(items: list, rounds: int = 3) -> float:
    """ms per item to collate ``items`` into one batch and hand it over, in a DataLoader worker as in
    training (median of ``rounds`` batches)."""
    loader = torch.utils.data.DataLoader(_Ready(items * rounds), batch_size=len(items), num_workers=1,
                                         collate_fn=_collate_and_send)
    return 1e3 * statistics.median(list(loader)) / len(items)


def bench_clip(path, name: str, rgb_shape, spec_shape, reps: int, warmup: int, batch: int) -> list[dict]:
    from mbt_fast.data import VideoDataset
    from mbt_fast.data.video import read_clips

    from mbt_fast.data.prepared import PreparedDataset, prepare

    sets = {m: VideoDataset([(str(path), [0])], num_classes=527, rgb_shape=rgb_shape, spectrogram_shape=spec_shape,
                            mode=m) for m in ("train", "eval")}
    csv = path.with_suffix(".csv")
    csv.write_text(f"{path},0\n")
    t0 = time.perf_counter()
    prepare(csv, path.with_suffix(".prepared"), crop=min(rgb_shape[1:]), num_mel=spec_shape[1], progress=False)
    prepare_s = time.perf_counter() - t0
    prep = {m: PreparedDataset(path.with_suffix(".prepared"), num_classes=527, rgb_shape=rgb_shape,
                               spectrogram_shape=spec_shape, mode=m) for m in ("train", "eval")}
    times = {"full": [], "train": [], "eval": [], "prepared train": [], "prepared eval": []}
    for r in range(warmup + reps):
        if r == warmup:
            for ds in sets.values():
                ds.stage_seconds, ds.stats = {}, collections.Counter()  # count the timed rounds only
        t0 = time.perf_counter()
        n_frames = full_decode(path)
        times["full"].append(1e3 * (time.perf_counter() - t0))
        for m, ds in sets.items():
            t0 = time.perf_counter()
            ds[(0, 1000 + r)]  # a new seed each round: another clip offset / crop
            times[m].append(1e3 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            prep[m][(0, 1000 + r)]  # the same item from the prepared cache
            times[f"prepared {m}"].append(1e3 * (time.perf_counter() - t0))
    times = {k: v[warmup:] for k, v in times.items()}
    full = statistics.median(times["full"])
    rows = [{"op": "full_decode", "clip": name, "mode": "-", **_summary(times["full"]),
             "clips_per_s": 1e3 / full, "frames_in_file": n_frames, "frames_decoded": n_frames, "status": "ok"}]
    for m, ds in sets.items():
        st = {k: 1e3 * v / reps for k, v in ds.stage_seconds.items()}  # the timed rounds only
        paths = {k: v for k, v in ds.stats.items() if k in ("seek", "decode_fallback")} if ds.stats else {}
        ds.stage_seconds = None
        collate_ms = worker_collate_ms([ds[(0, 5000 + i)] for i in range(batch)])
        stages = {"demux/seek_ms": st.get("demux/seek", 0.0), "decode_ms": st.get("decode", 0.0),
                  "resize/crop_ms": st.get("resize/crop", 0.0),
                  "audio+log-mel_ms": st.get("audio", 0.0) + st.get("log-mel", 0.0), "collate_ms": collate_ms}
        s = _summary(times[m])
        item_ms = s["median_ms"] + collate_ms
        probe = read_clips(path, rgb_shape[0], rgb_shape[1:], m, rng=np.random.default_rng(7))
        rows.append({"op": "item", "clip": name, "mode": m, "rgb_shape": "x".join(map(str, rgb_shape)),
                     "spectrogram_shape": "x".join(map(str, spec_shape)), **s, "clips_per_s": 1e3 / item_ms,
                     "full_decode_ms": full, "ratio_vs_full_decode": item_ms / full,
                     "frames_decoded": getattr(probe, "frames_decoded", n_frames), "frames_in_file": n_frames, **stages,
                     "decode_path": " ".join(f"{k}={v}" for k, v in sorted(paths.items())), "status": "ok"})
        p_collate = worker_collate_ms([prep[m][(0, 5000 + i)] for i in range(batch)])
        sp = _summary(times[f"prepared {m}"])
        p_ms = sp["median_ms"] + p_collate
        rows.append({"op": "prepared", "clip": name, "mode": m, "rgb_shape": "x".join(map(str, rgb_shape)),
                     "spectrogram_shape": "x".join(map(str, spec_shape)), **sp, "clips_per_s": 1e3 / p_ms,
                     "collate_ms": p_collate, "full_decode_ms": full, "ratio_vs_full_decode": p_ms / full,
                     "prepare_s": prepare_s, "speedup_vs_video_item": item_ms / p_ms, "decode_path": "prepared",
                     "status": "ok"})
    return rows


def resize_check(seed: int = 0) -> dict:
    """max/mean |resize - tf.image.resize bilinear| (levels of 255) on a texture frame, 854x480 -> 455x256:
    this pipeline's uint8 resize, and FFmpeg's swscale BILINEAR (antialiased) for comparison."""
    import av
    from av.video.reformatter import VideoReformatter

    from mbt_fast.data.testing import texture_frame
    from mbt_fast.data.video import resize_uint8

    frame = av.VideoFrame.from_ndarray(texture_frame(7 + seed, 854, 480, 30.0), format="rgb24").reformat(format="yuv420p")
    rgb = frame.to_ndarray(format="rgb24")
    # tf.image.resize(bilinear, antialias=False) == torch's float bilinear with half-pixel centres
    ref = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].double(), size=(256, 455), mode="bilinear",
                        align_corners=False)[0]
    ours = resize_uint8(torch.from_numpy(rgb), (256, 455)).double()
    sws = torch.from_numpy(VideoReformatter().reformat(frame, width=455, height=256, format="rgb24",
                                                       interpolation="BILINEAR", threads=1).to_ndarray())
    sws = sws.permute(2, 0, 1).double()
    d_ours, d_sws = (ours - ref).abs(), (sws - ref).abs()
    return {"image": "texture_frame 854x480 -> 455x256", "uint8_bilinear_max": d_ours.max().item(),
            "uint8_bilinear_mean": d_ours.mean().item(), "swscale_bilinear_max": d_sws.max().item(),
            "swscale_bilinear_mean": d_sws.mean().item()}


def write_markdown(rows: list[dict], resize: dict, path: Path, env: dict, cmd: str, batch: int) -> Path:
    lines = [f"# Data loading per core (CPU measurement)", "",
             f"`{cmd}` -- {env['device']}, torch {env['torch']}, PyAV {common.version('av')}, commit {env['commit']}; "
             "torch and FFmpeg single-threaded. ms per item (median over interleaved rounds, collate added: "
             f"batches of {batch} collated in a DataLoader worker, hand-off to the training process "
             "included); ratio = item / decoding every video frame of the file with PyAV.", "",
             "| clip | mode | ms/item | clips/s | full decode ms | ratio | frames decoded/file | "
             + " | ".join(f"{s} ms" for s in STAGES) + " |",
             "|" + " --- |" * (7 + len(STAGES))]
    for r in rows:
        if r["op"] != "item":
            continue
        lines.append(f"| {r['clip']} | {r['mode']} | {r['median_ms'] + r['collate_ms']:.1f} | {r['clips_per_s']:.2f} | "
                     f"{r['full_decode_ms']:.1f} | {r['ratio_vs_full_decode']:.2f} | "
                     f"{r['frames_decoded']}/{r['frames_in_file']} | "
                     + " | ".join(f"{r[f'{s}_ms']:.1f}" for s in STAGES) + " |")
    lines += ["", "Prepared cache (`mbt-fast prepare`, then `train --prepared`): the same items, seeds and rounds, "
              "read from the cache instead of the video (ms per item with collate; the cache sits in a temporary folder, warm in the page cache: from a cold disk add reading ~11 MB per MBT-B clip).", "",
              "| clip | mode | ms/item | clips/s | speed-up vs video item | prepare s (once) |", "|" + " --- |" * 6]
    for r in rows:
        if r["op"] == "prepared":
            lines.append(f"| {r['clip']} | {r['mode']} | {r['median_ms'] + r['collate_ms']:.1f} | "
                         f"{r['clips_per_s']:.1f} | {r['speedup_vs_video_item']:.1f}x | {r['prepare_s']:.1f} |")
    lines += ["", f"Resize vs tf.image.resize (bilinear, half-pixel centres), {resize['image']}, levels of 255: "
              f"this pipeline (uint8 bilinear) max {resize['uint8_bilinear_max']:.2f} mean {resize['uint8_bilinear_mean']:.3f}; "
              f"FFmpeg swscale BILINEAR (antialiased) max {resize['swscale_bilinear_max']:.2f} "
              f"mean {resize['swscale_bilinear_mean']:.3f}.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="854x480", help="WxH of the generated clip")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--keyframe-every", type=float, default=2.0, help="seconds between keyframes (fixed GOP)")
    ap.add_argument("--sweep", action="store_true", help="also other resolutions / fps / GOP lengths (slower)")
    ap.add_argument("--tiny", action="store_true", help="2 s 160x96 clip, 8x32x32 RGB, 64x32 log-mel (tests)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 10, tiny 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="items per collate timing")
    ap.add_argument("--json", action="store_true", help="print the rows and resize check as JSON")
    ap.add_argument("--out", default=None, help="folder for data.csv / data.md (default bench/results/cpu)")


def run(args) -> list[dict]:
    torch.set_num_threads(1)  # per core
    w, h = (int(x) for x in args.size.lower().split("x"))
    if args.tiny:
        configs, seconds = [(160, 96, 15, 0.5)], 2.0
        rgb_shape, spec_shape = (8, 32, 32), (64, 32)
    else:
        configs, seconds = [(w, h, args.fps, args.keyframe_every)] + (SWEEP if args.sweep else []), args.seconds
        rgb_shape, spec_shape = (32, 224, 224), (800, 128)
    reps = args.reps or (2 if args.tiny else 10)
    device = torch.device("cpu")
    env = common.env_row(device, torch.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cw, chh, fps, key_s in configs:
            name = clip_name(cw, chh, fps, key_s, seconds)
            path = make_clip(Path(tmp), cw, chh, fps, key_s, seconds)
            for r in bench_clip(path, name, rgb_shape, spec_shape, reps, args.warmup, args.batch):
                rows.append({**env, **r})
            if not args.json:
                for r in rows[-5:]:
                    print(f"  {name:28s} {r['op']:11s} {r['mode']:5s} {r['median_ms']:8.1f} ms "
                          f"{r.get('ratio_vs_full_decode') or 0:5.2f}x full decode", flush=True)
    resize = resize_check()
    out = common.out_dir(device, args.out)
    cmd = "mbt-fast bench data" + (" --sweep" if args.sweep else "") + (" --tiny" if args.tiny else "")
    if args.json:
        common.write_csv(rows, out / "data.csv", COLUMNS)
        print(json.dumps({"measurement": "CPU measurement", "rows": rows, "resize": resize}, indent=1, default=str))
    else:
        common.publish(rows, out, "data", COLUMNS,
                       ["clip", "op", "mode", "median_ms", "clips_per_s", "full_decode_ms", "ratio_vs_full_decode",
                        "frames_decoded", *[f"{s}_ms" for s in STAGES]],
                       title=f"\ndata loading per core ({env['measurement']}; torch {env['torch']}, commit {env['commit']})",
                       plot_args=None)
        print(f"resize vs tf.image.resize bilinear: {resize}")
    write_markdown(rows, resize, out / "data.md", env, cmd, args.batch)
    return rows


main = common.main_for(add_arguments, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
