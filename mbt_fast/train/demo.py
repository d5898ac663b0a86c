"""The fusion demo: the tiny MBT on the synthetic audio-visual task, four ways, on the CPU in minutes.

Variants: ``unimodal_rgb``, ``unimodal_spectrogram``, ``late_fusion`` (``fusion_layer = num_layers``:
no cross-modal attention, per-modality logits averaged) and ``bottleneck_fusion`` (the tiny preset's
fusion layer). The task (:mod:`mbt_fast.data.synthetic`) caps either modality alone at 62.5 %
accuracy; models that see both can approach 100 %.

``preset="tiny_trimodal"`` adds optical flow and the task's motion bit (16 classes): the variants are
``unimodal_<m>`` for each of the three modalities, ``bottleneck_fusion_av`` (rgb + spectrogram only,
capped at 50 %), ``late_fusion`` and ``bottleneck_fusion``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

VARIANTS = ("unimodal_rgb", "unimodal_spectrogram", "late_fusion", "bottleneck_fusion")
DEMO_PRESETS = ("tiny", "tiny_trimodal")


def demo_variants(preset: str = "tiny") -> tuple[str, ...]:
    """The demo's variants for ``preset``: each modality alone, (with three) the AV pair, late, bottleneck."""
    import mbt_fast

    if preset not in DEMO_PRESETS:
        raise ValueError(f"preset: expected one of {DEMO_PRESETS}, got {preset!r}")
    mods = mbt_fast.MBTConfig.preset(preset).modality_fusion
    av = ("bottleneck_fusion_av",) if len(mods) > 2 else ()
    return (*(f"unimodal_{m}" for m in sorted(mods, key=("rgb", "spectrogram", "flow").index)), *av,
            "late_fusion", "bottleneck_fusion")


def variant_config(name: str, preset: str = "tiny"):
    import mbt_fast

    cfg = mbt_fast.MBTConfig.preset(preset)
    cfg = dataclasses.replace(cfg, num_classes=_dataset(preset, cfg.modality_fusion, 1, 0, "val", 1.0).num_classes)
    if name not in demo_variants(preset):
        raise ValueError(f"variant must be one of {demo_variants(preset)}, got {name!r}")
    if name.startswith("unimodal_"):
        m = name[len("unimodal_"):]
        return dataclasses.replace(cfg, modality_fusion=(m,), use_bottleneck=False, input_shapes={m: cfg.input_shapes[m]})
    if name == "bottleneck_fusion_av":
        return dataclasses.replace(cfg, modality_fusion=("spectrogram", "rgb"),
                                   input_shapes={m: cfg.input_shapes[m] for m in ("spectrogram", "rgb")})
    if name == "late_fusion":
        return dataclasses.replace(cfg, fusion_layer=cfg.num_layers)
    return cfg


def _dataset(preset, modalities, size, seed, split, noise):
    """The preset's task (every variant of a preset gets the same examples: the generator draws every
    modality either way and returns the variant's ``modalities``)."""
    import mbt_fast
    from mbt_fast.data.synthetic import SyntheticAVDataset

    full = mbt_fast.MBTConfig.preset(preset)
    extra = {"flow": full.input_shapes["flow"][1:4]} if "flow" in full.input_shapes else None
    return SyntheticAVDataset(size, full.rgb_shape, full.spectrogram_shape, seed=seed, split=split, noise=noise,
                              modalities=modalities, extra_shapes=extra)


def run_demo(out_dir="runs/demo", steps: int = 300, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             val_size: int = 512, threads: int | None = 1, variants=None, backend: str = "torch",
             progress: bool = True, plot: bool = True, noise: float = 1.0, preset: str = "tiny") -> dict:
    """Train every variant for ``steps`` steps on the same data; write ``summary.json`` and ``demo.png``."""
    from mbt_fast.train.trainer import TrainConfig, train

    names = demo_variants(preset) if variants is None else tuple(variants)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if threads:
        # one thread is the robust choice on a small shared CPU: spinning OpenMP threads that fight
        # for busy cores can make a step 10-100x slower
        torch.set_num_threads(threads)
    summary, curves = {}, {}
    try:
        for name in names:
            cfg = variant_config(name, preset)
            tc = TrainConfig(out_dir=str(out / name), steps=steps, batch_size=batch_size, optimizer="adamw", lr=lr,
                             weight_decay=0.01, warmup_steps=max(1, steps // 10), label_smoothing=0.0,
                             mixup_alpha=0.0, grad_clip=1.0, seed=seed, backend=backend, device="cpu",
                             ckpt_every=0, progress=progress, plot=False)
            train_ds = _dataset(preset, cfg.modality_fusion, max(steps * batch_size, batch_size), seed, "train", noise)
            val_ds = _dataset(preset, cfg.modality_fusion, val_size, seed, "val", noise)
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
        plot_demo(summary, curves, out / "demo.png", preset)
    return summary


def task_bounds(preset: str = "tiny") -> dict:
    """The task's accuracy bounds: best from one modality alone, (three modalities) best from rgb +
    spectrogram without the flow, and chance."""
    ds = _dataset(preset, ("rgb",), 1, 0, "val", 1.0)
    out = {"best unimodal possible": ds.best_unimodal_accuracy, "chance": 1.0 / ds.num_classes}
    if ds.extra_shapes:
        out["best from rgb + spectrogram"] = 0.5
    return out


def format_table(summary: dict, preset: str = "tiny") -> str:
    lines = [f"{'variant':<22} {'val accuracy':>12} {'train s':>8}", "-" * 44]
    for name, r in summary.items():
        lines.append(f"{name:<22} {r['val_accuracy']:>12.3f} {r['train_seconds']:>8.1f}")
    lines.append("(" + "; ".join(f"{k}: {v:.3f}" for k, v in task_bounds(preset).items()) + ")")
    return "\n".join(lines)


def plot_demo(summary: dict, curves: dict, path, preset: str = "tiny") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11 + 1.2 * max(0, len(summary) - 4), 3.8))
    names = list(summary)
    a.bar(range(len(names)), [summary[n]["val_accuracy"] for n in names], color=[f"C{i}" for i in range(len(names))])
    for (label, y), ls in zip(task_bounds(preset).items(), ("--", ":", "-.")):
        a.axhline(y, ls=ls, c="k", lw=0.8, label=label)
    a.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    a.set(ylim=(0, 1), ylabel="held-out accuracy", title=f"synthetic task ({preset})")
    a.legend(loc="upper left", fontsize=8)
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
