"""Attention maps of one prediction, as in the MBT paper's Figure 6.

The fused backends never materialise the attention matrix, so :func:`explain` always runs the
reference encoder (``backend="reference"``, Scenic line by line) with a recording hook on the
``Attention`` modules of one layer, and restores the model's backend and mode afterwards.

What is returned, for each modality ``m`` the example has, at one layer, averaged over heads:

- ``cls[m]``: the attention from ``m``'s CLS token to ``m``'s patches (``classifier="token"``);
- ``bottleneck[m]``: the attention from the bottleneck tokens to ``m``'s patches inside ``m``'s block,
  averaged over the bottleneck tokens (from the fusion layer on, in bottleneck models).

Each is reshaped to the patch grid: rgb ``[T/ft, H/fh, W/fw]`` (time-major, as the Conv3d tokens),
spectrogram ``[time/fh, mel/fw]``. The rows are the softmax over *all* keys of the block (CLS, the
patches, the bottleneck tokens), so a map sums to at most 1. A model without CLS token (``gap``,
``gmp``, ``gsp`` pooling) has only the bottleneck maps; a layer where neither exists is an error.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mbt_fast.config import MBTConfig
from mbt_fast.modalities import scenic_order
from mbt_fast.model import MBT


@dataclass
class Explanation:
    """The attention maps of one example at one layer (see the module docstring)."""

    cfg: MBTConfig
    layer: int
    modalities: tuple[str, ...]  # the modalities the example had and the model used
    cls: dict[str, np.ndarray]  # modality -> head-averaged CLS attention on its patch grid
    bottleneck: dict[str, np.ndarray]  # modality -> head- and token-averaged bottleneck attention
    logits: np.ndarray  # [num_classes]
    notes: list[str] = field(default_factory=list)  # why a map is absent

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads


def check_layer(cfg: MBTConfig, layer: int | None) -> int:
    """``layer`` as an index in ``[0, num_layers)`` (``None``: the last; negative counts from the end).

    Raises ``ValueError`` when it is out of range or when that layer has nothing to show (no CLS token
    and no bottleneck tokens there)."""
    n = cfg.num_layers
    if layer is None:
        layer = n - 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer: expected an index in [{-n}, {n - 1}] (the model has num_layers={n}), got {layer!r}")
    layer %= n
    if not cfg.has_cls:
        why = _why_no_bottleneck(cfg, layer)
        if why:
            hint = f"; pass a layer >= {cfg.fusion_layer}" if cfg.use_bottleneck and layer < cfg.fusion_layer else ""
            raise ValueError(f"layer: nothing to explain at layer {layer}: the model has no CLS token "
                             f"(classifier={cfg.classifier!r}) and {why}{hint}")
    return layer


def _why_no_bottleneck(cfg: MBTConfig, layer: int) -> str | None:
    """Why modality blocks at ``layer`` have no bottleneck tokens, or None when they should have them."""
    if not cfg.use_bottleneck:
        return "no bottleneck tokens (use_bottleneck=False)"
    if layer < cfg.fusion_layer:
        return f"no bottleneck tokens at layer {layer}: they join at the fusion layer (fusion_layer={cfg.fusion_layer})"
    if not cfg.test_with_bottlenecks:
        return "no bottleneck tokens at test time (test_with_bottlenecks=False)"
    if len(cfg.modality_fusion) < 2:
        return f"no bottleneck tokens: the model has one modality ({cfg.modality_fusion[0]}), nothing is fused"
    return None


@contextlib.contextmanager
def record_attention(model: MBT, layer: int):
    """Record the head-averaged attention of every block call at ``layer`` of the reference encoder.

    Yields a list that fills with ``(block key, [B, n, n] float32)`` in call order; the hooks are
    removed on exit, whatever happens."""
    records: list[tuple[str, torch.Tensor]] = []
    blocks = model.blocks[layer]
    for key, blk in blocks.items():
        blk.attn.record = lambda attn, key=key: records.append((key, attn.detach().float().mean(dim=1)))
    try:
        yield records
    finally:
        for blk in blocks.values():
            blk.attn.record = None


def _own_tokens(cfg: MBTConfig, m: str, n_keys: int, used) -> tuple[int, slice | None]:
    """(offset of ``m``'s tokens, slice of the bottleneck tokens or None) among the keys of ``m``'s block."""
    n_m, nb = cfg.num_tokens(m), cfg.num_bottleneck_tokens
    if n_keys == n_m:
        return 0, None
    if cfg.use_bottleneck and n_keys == n_m + nb:
        return 0, slice(n_m, n_keys)  # cat([x_m, bottleneck])
    ctx = sum(cfg.num_tokens(o) for o in scenic_order(used) if o != m)
    if not cfg.use_bottleneck and n_keys == ctx + n_m:
        return ctx, None  # vanilla fusion: cat(other modalities + [x_m])
    raise RuntimeError(f"{m}: an attention matrix over {n_keys} tokens does not match the model's token layout")


def _per_modality(cfg: MBTConfig, records, used) -> dict[str, tuple[torch.Tensor, int, slice | None]]:
    """modality -> (its [n, n] attention, offset of its tokens, bottleneck slice) from one layer's calls."""
    if not cfg.share_encoder:
        return {key: (a[0], *_own_tokens(cfg, key, a.shape[-1], used)) for key, a in records}
    if len(records) == len(used):  # the shared block called once per modality, in model order
        return {m: (a[0], *_own_tokens(cfg, m, a.shape[-1], used)) for m, (_, a) in zip(used, records)}
    if len(records) == 1:  # vanilla fusion with a shared encoder: one joint sequence, modalities in order
        out, offset = {}, 0
        for m in used:
            out[m] = (records[0][1][0], offset, None)
            offset += cfg.num_tokens(m)
        return out
    raise RuntimeError(f"expected one attention call per modality {used} or one joint call, got {len(records)}")


def explain(model: MBT, inputs: dict[str, torch.Tensor], layer: int | None = None) -> Explanation:
    """The attention maps and logits of one example (see the module docstring).

    ``inputs``: ``{"rgb": [1, 3, T, H, W] in [-1, 1], "spectrogram": [1, time, mel]}``; a modality the
    model has but the example lacks (e.g. a video without audio) may be left out or None: the model then
    runs on the modalities present (``missing="drop"``)."""
    cfg = model.cfg
    layer = check_layer(cfg, layer)
    used = tuple(m for m in cfg.modality_fusion if inputs.get(m) is not None)
    if not used:
        raise ValueError(f"inputs: expected a tensor for at least one of {cfg.modality_fusion}, got {sorted(inputs)}")
    for m in used:
        x = inputs[m]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != 1:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{m}: expected one example (a leading batch axis of 1), got {got}")
    kwargs = {m: inputs[m] for m in used}
    if len(used) < len(cfg.modality_fusion):
        kwargs["missing"] = "drop"

    backend, training = model.backend, model.training
    model.set_backend("reference")
    model.eval()
    try:
        with torch.no_grad(), record_attention(model, layer) as records:
            logits = model(**kwargs)
    finally:
        model.set_backend(backend)
        model.train(training)

    cls, bottleneck, notes = {}, {}, []
    for m, (a, off, bott) in _per_modality(cfg, records, used).items():
        patches = slice(off + int(cfg.has_cls), off + cfg.num_tokens(m))
        grid = cfg.patch_grid(m)
        if cfg.has_cls:
            cls[m] = a[off, patches].reshape(grid).cpu().numpy()
        if bott is not None:
            bottleneck[m] = a[bott, patches].mean(dim=0).reshape(grid).cpu().numpy()
    if not cfg.has_cls:
        notes.append(f"no CLS token (classifier={cfg.classifier!r}): only the bottleneck attention is shown")
    if not bottleneck:
        why = _why_no_bottleneck(cfg, layer) or "no bottleneck tokens at this layer"
        if not cls:
            raise ValueError(f"layer: nothing to explain at layer {layer}: no CLS token (classifier={cfg.classifier!r}) and {why}")
        notes.append(why)
    missing = [m for m in cfg.modality_fusion if m not in used]
    if missing:
        notes.append(f"{', '.join(missing)} absent: the model ran on {', '.join(used)} only")
    return Explanation(cfg, layer, used, cls, bottleneck, logits[0].float().cpu().numpy(), notes)


# ---- images ----------------------------------------------------------------------------------------

def upsample(grid: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """Each patch's value over its pixels: ``[..., h', w'] -> [..., h'*ph, w'*pw]`` (nearest, so the map
    shows the model's actual resolution)."""
    return np.repeat(np.repeat(grid, patch[0], axis=-2), patch[1], axis=-1)


def _rows(expl: Explanation, m: str) -> list[tuple[str, np.ndarray]]:
    rows = []
    if m in expl.cls:
        rows.append((f"{m} CLS token", expl.cls[m]))
    if m in expl.bottleneck:
        rows.append((f"{expl.cfg.num_bottleneck_tokens} bottleneck tokens (mean)", expl.bottleneck[m]))
    return rows


def _title(expl: Explanation, what: str) -> str:
    c = expl.cfg
    return (f"Attention to the {what} patches, layer {expl.layer} (0-based, of {c.num_layers}; fusion layer "
            f"{c.fusion_layer})\nmean over {c.num_heads} heads; each row: which token attends\ncolour: its "
            f"softmax weight on each patch (scale per row)")


def plot_rgb(expl: Explanation, rgb: torch.Tensor, path, modality: str = "rgb") -> Path:
    """The CLS and bottleneck attention to the RGB patches over one frame per temporal patch position.

    ``rgb``: the model input ``[3, T, H, W]`` (or ``[1, 3, T, H, W]``) in [-1, 1]; with
    ``modality="flow"``, the flow ``[2, T, H, W]``, drawn as its magnitude (grey, per-clip scale)."""
    from matplotlib.figure import Figure

    fh, fw, ft = expl.cfg.patches_size
    if modality == "flow":
        mag = rgb.reshape(rgb.shape[-4:]).float().cpu().norm(dim=0)
        video = (mag / (mag.max() if mag.max() > 0 else 1.0))[..., None].expand(*mag.shape, 3).numpy()
    else:
        video = ((rgb.reshape(rgb.shape[-4:]).float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    rows = _rows(expl, modality)
    n_t = expl.cfg.patch_grid(modality)[0]
    fig = Figure(figsize=(max(1.6 * n_t + 2.2, 6.0), 1.8 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), n_t, squeeze=False)
    for r, (label, grid) in enumerate(rows):
        up = upsample(grid, (fh, fw))
        vmax = float(grid.max()) or 1.0
        for t in range(n_t):
            ax = axes[r, t]
            ax.imshow(video[t * ft])  # the tubelet's first frame
            im = ax.imshow(up[t], cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frames {t * ft}-{t * ft + ft - 1}", fontsize=8)
        axes[r, 0].set_ylabel(label.replace(" (", "\n("), fontsize=8)
        fig.colorbar(im, ax=list(axes[r]), shrink=0.9, label="attention")
    fig.suptitle(_title(expl, "RGB" if modality == "rgb" else "optical-flow (magnitude)"), fontsize=9)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_spectrogram(expl: Explanation, spectrogram: torch.Tensor, path) -> Path:
    """The CLS and bottleneck attention to the spectrogram's time-frequency patches over the spectrogram.

    ``spectrogram``: the model input ``[time, mel]`` (or ``[1, time, mel]``)."""
    from matplotlib.figure import Figure

    from mbt_fast.data.audio import HOP_LENGTH, SAMPLE_RATE

    fh, fw, _ = expl.cfg.patches_size
    spec = spectrogram.reshape(spectrogram.shape[-2:]).float().cpu().numpy()
    time, mel = spec.shape
    extent = (0.0, time * HOP_LENGTH / SAMPLE_RATE, 0.0, mel)
    rows = _rows(expl, "spectrogram")
    fig = Figure(figsize=(7.5, 2.6 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, grid) in zip(axes, rows):
        # [time, mel] -> image rows = mel (low frequencies at the bottom), columns = time
        ax.imshow(spec.T, origin="lower", aspect="auto", cmap="gray", extent=extent)
        im = ax.imshow(upsample(grid, (fh, fw)).T, origin="lower", aspect="auto", cmap="jet", alpha=0.5,
                       vmin=0.0, vmax=float(grid.max()) or 1.0, extent=extent, interpolation="nearest")
        ax.set_title(f"{label} -> spectrogram patches ({fh} frames x {fw} mel bins each)", fontsize=8)
        ax.set_ylabel("mel bin")
        fig.colorbar(im, ax=ax, label="attention")
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(_title(expl, "spectrogram"), fontsize=9)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_top_classes(names: list[str], scores: np.ndarray, path, top_k: int = 5, title: str = "") -> Path:
    """A horizontal bar chart of the ``top_k`` highest ``scores`` with their class ``names``."""
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    if len(names) != len(scores):
        raise ValueError(f"names: expected one per class ({len(scores)}), got {len(names)}")
    order = np.argsort(-scores, kind="stable")[:top_k]
    fig = Figure(figsize=(7.0, 0.45 * len(order) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(order))[::-1]  # best at the top
    ax.barh(y, scores[order], color="tab:blue")
    ax.set_yticks(y, [names[i] for i in order], fontsize=8)
    for yi, i in zip(y, order):
        ax.text(scores[i], yi, f" {scores[i]:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("score")
    ax.set_title(title or f"top {len(order)} classes", fontsize=9)
    fig.savefig(path, dpi=100)
    return Path(path)


def save(out_dir, explanations: list[Explanation], inputs: dict[str, torch.Tensor], names: list[str],
         scores: np.ndarray, top_k: int = 5, score_kind: str = "softmax") -> list[Path]:
    """Write the images and ``attention.npz`` for the clips of one file; returns the paths written.

    ``inputs``: the clips' model inputs with a leading clip axis (rgb ``[K, 3, T, H, W]``, spectrogram
    ``[K, time, mel]``); ``scores``: the file's ``[num_classes]`` scores (of its clip-averaged logits),
    shown in the chart. Per clip: ``rgb_attention.png``, ``spectrogram_attention.png``,
    ``flow_attention.png`` (``_clip<k>``
    suffixed when K > 1); once: ``top_classes.png`` and ``attention.npz``: every map with a leading clip
    axis (``cls_<modality>``, ``bottleneck_<modality>``), ``clip_logits`` ``[K, C]``, ``scores``,
    ``class_names``, ``layer``, ``num_heads``, ``num_bottleneck_tokens``, ``modalities``, ``notes``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    paths = []
    for k, expl in enumerate(explanations):
        suffix = f"_clip{k}" if len(explanations) > 1 else ""
        if "rgb" in expl.modalities:
            paths.append(plot_rgb(expl, inputs["rgb"][k], out / f"rgb_attention{suffix}.png"))
        if "spectrogram" in expl.modalities:
            paths.append(plot_spectrogram(expl, inputs["spectrogram"][k], out / f"spectrogram_attention{suffix}.png"))
        if "flow" in expl.modalities:
            paths.append(plot_rgb(expl, inputs["flow"][k], out / f"flow_attention{suffix}.png", modality="flow"))
    first = explanations[0]
    clips = f", {len(explanations)} clips" if len(explanations) > 1 else ""
    paths.append(plot_top_classes(names, scores, out / "top_classes.png", top_k,
                                  title=f"top {min(top_k, len(names))} classes ({score_kind}; from "
                                        f"{' + '.join(first.modalities)}{clips})"))
    arrays = {"layer": np.int64(first.layer), "num_heads": np.int64(first.num_heads),
              "num_bottleneck_tokens": np.int64(first.cfg.num_bottleneck_tokens),
              "modalities": np.array(first.modalities), "class_names": np.array(names),
              "clip_logits": np.stack([e.logits for e in explanations]), "scores": scores,
              "notes": np.array(first.notes, dtype=str)}
    for kind in ("cls", "bottleneck"):
        for m in getattr(first, kind):
            arrays[f"{kind}_{m}"] = np.stack([getattr(e, kind)[m] for e in explanations])
    np.savez(out / "attention.npz", **arrays)
    paths.append(out / "attention.npz")
    return paths
