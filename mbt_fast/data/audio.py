"""Log-mel spectrograms in plain PyTorch (no torchaudio needed).

The recipe (MBT paper Sec. 4.2 as far as it is stated, the rest chosen here and fixed):

- 16 kHz mono waveform (float, [-1, 1]); other rates are resampled band-limited with an FFT;
- STFT: 25 ms Hamming window (400 samples), 10 ms hop (160 samples), FFT size 1024 (the window
  zero-padded, so every one of the 128 low mel filters covers at least one FFT bin), centred frames
  with zero padding -> ``1 + num_samples // 160`` frames, i.e. 100 frames per second (8 s -> 801, of
  which the clip sampler takes 800);
- power spectrum ``|X|^2`` -> 128 triangular HTK mel filters over 0 .. 8000 Hz (unnormalised
  triangles, peak 1) -> ``log(mel + 1e-6)``;
- normalised ``(logmel - mean) / std`` with Scenic's constants (mean 1.102, std 2.762) by default.

Google never released its extractor (Scenic issue #254), so Scenic's constants only approximately
standardise these features; pass your own ``mean``/``std`` (e.g. computed with
:func:`spectrogram_stats`) when training from scratch on your data.
"""
from __future__ import annotations

import functools
import math

import torch

SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms at 16 kHz -> 100 frames per second
N_FFT = 1024
LOG_OFFSET = 1e-6
SCENIC_SPEC_MEAN = 1.102
SCENIC_SPEC_STD = 2.762


def hz_to_mel(f: float) -> float:
    """HTK mel scale."""
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(num_mel: int = 128, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """Triangular HTK mel filters, ``[n_fft // 2 + 1, num_mel]`` (peak 1, not area-normalised)."""
    if num_mel < 1:
        raise ValueError(f"num_mel must be >= 1, got {num_mel}")
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_pts = torch.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mel + 2, dtype=torch.float64)
    hz_pts = mel_to_hz(mel_pts)
    lower, centre, upper = hz_pts[:-2], hz_pts[1:-1], hz_pts[2:]
    f = fft_freqs[:, None]
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling along the last axis by truncating / zero-padding the spectrum.

    Exact for periodic signals; on a clip it can ring a little at the two ends, which the
    spectrogram barely sees. (Decoding through :mod:`mbt_fast.data.video` already hands back
    16 kHz audio resampled by FFmpeg's libswresample, so this path is for raw waveforms.)
    """
    if orig_rate == new_rate:
        return waveform
    n = waveform.shape[-1]
    n_new = max(1, round(n * new_rate / orig_rate))
    spec = torch.fft.rfft(waveform.to(torch.float64), dim=-1)
    keep = min(spec.shape[-1], n_new // 2 + 1)
    out = torch.zeros(*spec.shape[:-1], n_new // 2 + 1, dtype=spec.dtype)
    out[..., :keep] = spec[..., :keep]
    return (torch.fft.irfft(out, n=n_new, dim=-1) * (n_new / n)).to(waveform.dtype)


def log_mel_spectrogram(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel: int = 128) -> torch.Tensor:
    """Mono waveform ``[num_samples]`` (or ``[channels, num_samples]``, averaged) -> ``[frames, num_mel]``
    un-normalised log-mel, 100 frames per second (recipe in the module docstring)."""
    if not torch.is_tensor(waveform):
        raise TypeError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dim() == 2:
        waveform = waveform.mean(0)
    if waveform.dim() != 1:
        raise ValueError(f"waveform must be [num_samples] or [channels, num_samples], got shape {tuple(waveform.shape)}")
    wav = resample(waveform.to(torch.float32), sample_rate, SAMPLE_RATE)
    window, filters = _stft_constants(num_mel)
    stft = torch.stft(wav, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=window,
                      center=True, pad_mode="constant", return_complex=True)
    power = stft.real.square().add_(stft.imag.square())  # [freq, frames]
    mel = power.transpose(0, 1) @ filters
    return mel.add_(LOG_OFFSET).log_()


@functools.lru_cache(maxsize=8)
def _stft_constants(num_mel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window and the mel filters, made once per process (read only)."""
    return torch.hamming_window(WIN_LENGTH, periodic=False, dtype=torch.float32), mel_filterbank(num_mel)


def normalize_spectrogram(logmel: torch.Tensor, mean: float = SCENIC_SPEC_MEAN, std: float = SCENIC_SPEC_STD) -> torch.Tensor:
    return (logmel - mean) / std


def spectrogram_stats(logmels) -> tuple[float, float]:
    """Mean and std over all frames and bins of an iterable of un-normalised log-mels."""
    total, total_sq, count = 0.0, 0.0, 0
    for x in logmels:
        x = x.double()
        total += x.sum().item()
        total_sq += x.square().sum().item()
        count += x.numel()
    if count == 0:
        raise ValueError("spectrogram_stats needs at least one non-empty spectrogram")
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))


def sample_window(length: int, window: int, start_proportion: float) -> torch.Tensor:
    """Indices of a ``window``-frame slice of a ``length``-frame sequence starting at
    ``round(start_proportion * length)`` (Scenic's synced sampling), clamped so it fits; sequences
    shorter than the window are repeated from their start (Scenic's ``repeat_sequence``)."""
    if length < 1:
        raise ValueError(f"cannot sample from an empty sequence (length {length})")
    if length < window:
        return torch.arange(window) % length
    start = min(int(round(start_proportion * length)), length - window)
    return torch.arange(start, start + window)
