"""Training augmentations of Scenic's MBT recipe: SpecAugment frequency masking and mixup."""
from __future__ import annotations

import torch

SCENIC_FREQ_MASK_MAX_BINS = 48  # for 128 mel bins


def spec_augment_freq(spec: torch.Tensor, generator: torch.Generator | None = None,
                      max_bins: int | None = None, num_masks: int = 1) -> torch.Tensor:
    """Frequency masking of one (normalised) spectrogram ``[time, mel]``; returns a new tensor.

    As lingvo's SpectrumAugmenter with Scenic's settings (time masks and warping are disabled there by
    their zero ratios): one mask of ``int(max_bins * U[0, 1))`` consecutive mel bins at a uniform start,
    masked values set to 0. ``max_bins`` defaults to 48 scaled to the mel count (48 of 128).
    """
    if spec.dim() != 2:
        raise ValueError(f"spec must be [time, mel], got shape {tuple(spec.shape)}")
    num_mel = spec.shape[1]
    if max_bins is None:
        max_bins = int(round(SCENIC_FREQ_MASK_MAX_BINS * num_mel / 128))
    out = spec.clone()
    for _ in range(num_masks):
        u, v = torch.rand(2, generator=generator).tolist()
        size = min(int(max_bins * u), num_mel)
        start = int(v * (num_mel - size + 1)) if size else 0
        out[:, start:start + size] = 0.0
    return out


def sample_mixup_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """One lambda ~ Beta(alpha, alpha) per batch, drawn from ``generator`` (checkpointable)."""
    if alpha <= 0:
        return 1.0
    # torch.distributions.Beta draws from the global RNG; seed numpy from the dedicated generator
    # instead so lambda depends only on checkpointed state.
    import numpy as np

    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(batch: dict, lam: float, keys=("rgb", "spectrogram", "label")) -> dict:
    """Scenic's ``mixup_modalities``: ``x <- lam * x + (1 - lam) * x[::-1]`` for every modality and the
    labels with the same lambda (partner = the reversed batch). Returns a new dict. A ragged feature
    sequence's ``<key>_length`` becomes the longer of the two: its mix holds data wherever either does."""
    out = dict(batch)
    for k in keys:
        if k in batch and torch.is_tensor(batch[k]):
            x = batch[k]
            out[k] = lam * x + (1.0 - lam) * x.flip(0)
        if f"{k}_length" in batch:
            n = batch[f"{k}_length"]
            out[f"{k}_length"] = torch.maximum(n, n.flip(0))
    return out
