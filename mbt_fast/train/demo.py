"""The fusion demo: the tiny MBT on the synthetic audio-visual task, four ways, on the CPU in minutes.

Variants: ``unimodal_rgb``, ``unimodal_spectrogram``, ``late_fusion`` (``fusion_layer = num_layers``:
no cross-modal attention, per-modality logits averaged) and ``bottleneck_fusion`` (the tiny preset's
fusion layer). The task (:mod:`mbt_fast.data.synthetic`) caps either modality alone at 62.5 %
accuracy; models that see both can approach 100 %.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

VARIANTS = ("unimodal_rgb", "unimodal_spectrogram", "late_fusion", "bottleneck_fusion")


def variant_config(name: str, base=None):
    import mbt_fast
    from mbt_fast.data.synthetic import NUM_CLASSES

    cfg = base or mbt_fast.MBTConfig.preset("tiny")
    cfg = dataclasses.replace(cfg, num_classes=NUM_CLASSES)
    if name == "unimodal_rgb":
        return dataclasses.replace(cfg, modality_fusion=("rgb",), use_bottleneck=False,
                                   input_shapes={"rgb": cfg.input_shapes["rgb"]})
    if name == "unimodal_spectrogram":
        return dataclasses.replace(cfg, modality_fusion=("spectrogram",), use_bottleneck=False,
                                   input_shapes={"spectrogram": cfg.input_shapes["spectrogram"]})
    if name == "late_fusion":
        return dataclasses.replace(cfg, fusion_layer=cfg.num_layers)
    if name == "bottleneck_fusion":
        return cfg
    raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")


def run_demo(out_dir="runs/demo", steps: int = 300, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             val_size: int = 512, threads: int | None = 1, variants=VARIANTS, backend: str = "torch",
             progress: bool = True, plot: bool = True, noise: float = 1.0) -> dict:
    """Train every variant for ``steps`` steps on the same data; write ``summary.json`` and ``demo.png``."""
    from mbt_fast.data.synthetic import SyntheticAVDataset
    from mbt_fast.train.trainer import TrainConfig, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if threads:
        # one thread is the robust choice on a small shared CPU: spinning OpenMP threads that fight
        # for busy cores can make a step 10-100x slower
        torch.set_num_threads(threads)
    summary, curves = {}, {}
    try:
        for name in variants:
            cfg = variant_config(name)
            tc = TrainConfig(out_dir=str(out / name), steps=steps, batch_size=batch_size, optimizer="adamw", lr=lr,
                             weight_decay=0.01, warmup_steps=max(1, steps // 10), label_smoothing=0.0,
                             mixup_alpha=0.0, grad_clip=1.0, seed=seed, backend=backend, device="cpu",
                             ckpt_every=0, progress=progress, plot=False)
            # every variant sees the same examples (the generator draws both modalities either way)
            train_ds = SyntheticAVDataset(max(steps * batch_size, batch_size), cfg_shape(cfg, "rgb"),
                                          cfg_shape(cfg, "spectrogram"), seed=seed, split="train", noise=noise)
            val_ds = SyntheticAVDataset(val_size, cfg_shape(cfg, "rgb"), cfg_shape(cfg, "spectrogram"),
                                        seed=seed, split="val", noise=noise)
            t0 = time.perf_counter()
            # a re-run replaces the demo's previous variant runs (moved aside, never deleted)
            res = train(tc, cfg, train_ds, val_ds, overwrite=True)
            seconds = time.perf_counter() - t0
            summary[name] = {"val_accuracy": res["eval"]["accuracy"], "train_seconds": round(seconds, 2)}
            metrics = out / name / "metrics.jsonl"
            curves[name] = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    finally:
        torch.set_num_threads(old_threads)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if plot:
        plot_demo(summary, curves, out / "demo.png")
    return summary


def cfg_shape(cfg, modality):
    """The input shape for ``modality`` from the tiny preset (the unimodal configs lack the other one)."""
    import mbt_fast

    tiny = mbt_fast.MBTConfig.preset("tiny")
    src = cfg if modality in cfg.input_shapes else tiny
    return src.rgb_shape if modality == "rgb" else src.spectrogram_shape


def format_table(summary: dict) -> str:
    from mbt_fast.data.synthetic import BEST_UNIMODAL_ACCURACY

    lines = [f"{'variant':<22} {'val accuracy':>12} {'train s':>8}", "-" * 44]
    for name, r in summary.items():
        lines.append(f"{name:<22} {r['val_accuracy']:>12.3f} {r['train_seconds']:>8.1f}")
    lines.append(f"(best possible from one modality alone: {BEST_UNIMODAL_ACCURACY:.3f}; chance 0.125)")
    return "\n".join(lines)


def plot_demo(summary: dict, curves: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mbt_fast.data.synthetic import BEST_UNIMODAL_ACCURACY

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(summary)
    a.bar(range(len(names)), [summary[n]["val_accuracy"] for n in names], color=["C0", "C1", "C2", "C3"][:len(names)])
    a.axhline(BEST_UNIMODAL_ACCURACY, ls="--", c="k", lw=0.8, label="best unimodal possible")
    a.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    a.set(ylim=(0, 1), ylabel="held-out accuracy", title="synthetic AV task")
    a.legend(loc="lower right")
    for i, n in enumerate(names):
        rows = curves.get(n, [])
        if rows:
            k = max(1, len(rows) // 50)  # light smoothing for legibility
            ys = [sum(r["loss"] for r in rows[j:j + k]) / len(rows[j:j + k]) for j in range(0, len(rows), k)]
            b.plot([rows[j]["step"] for j in range(0, len(rows), k)], ys, label=n, c=f"C{i}")
    b.set(xlabel="step", ylabel="train loss", title="training loss")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
