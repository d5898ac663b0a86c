"""Log-mel recipe, resampling, window sampling, SpecAugment and mixup."""
import math

import pytest
import torch

from mbt_fast.data import audio
from mbt_fast.data.augment import mixup, sample_mixup_lambda, spec_augment_freq


def test_filterbank_has_no_empty_filter_and_peaks_at_one():
    fb = audio.mel_filterbank(128)
    assert fb.shape == (audio.N_FFT // 2 + 1, 128)
    assert (fb.sum(0) > 0).all(), f"empty mel filters: {(fb.sum(0) == 0).nonzero().flatten().tolist()}"
    assert fb.max() <= 1.0 + 1e-6


def test_frames_per_second_and_tone_position():
    sr = audio.SAMPLE_RATE
    t = torch.arange(2 * sr) / sr
    tone = 0.5 * torch.sin(2 * math.pi * 1000.0 * t)
    logmel = audio.log_mel_spectrogram(tone, sr, num_mel=128)
    assert logmel.shape == (1 + 2 * sr // audio.HOP_LENGTH, 128)  # 100 frames per second (+1 centred frame)
    peak = logmel[50:150].mean(0).argmax().item()
    # the filter whose centre is nearest to 1 kHz
    mels = torch.linspace(audio.hz_to_mel(0.0), audio.hz_to_mel(8000.0), 130)[1:-1]
    expected = (audio.mel_to_hz(mels) - 1000.0).abs().argmin().item()
    assert abs(peak - expected) <= 1, (peak, expected)
    silence = audio.log_mel_spectrogram(torch.zeros(sr), sr)
    assert torch.allclose(silence, torch.full_like(silence, math.log(audio.LOG_OFFSET)))


def test_resampling_keeps_the_tone_and_mixes_channels():
    sr = 44100
    t = torch.arange(sr) / sr
    stereo = torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 440 * t)])
    a = audio.log_mel_spectrogram(stereo, sr)
    b = audio.log_mel_spectrogram(torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000), 16000)
    assert a.shape == b.shape
    assert a[20:80].mean(0).argmax() == b[20:80].mean(0).argmax()
    assert len(audio.resample(torch.zeros(44100), 44100, 16000)) == 16000


def test_bad_waveform_rejected():
    with pytest.raises(ValueError, match="waveform"):
        audio.log_mel_spectrogram(torch.zeros(2, 2, 100))
    with pytest.raises(TypeError, match="waveform"):
        audio.log_mel_spectrogram([0.0] * 100)


def test_sample_window_repeats_short_and_clamps():
    assert audio.sample_window(3, 7, 0.5).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert audio.sample_window(801, 800, 0.0).tolist() == list(range(800))
    assert audio.sample_window(1000, 800, 0.9).tolist() == list(range(200, 1000))  # clamped to fit
    assert audio.sample_window(1000, 100, 0.5)[0].item() == 500


def test_spec_augment_masks_one_band_with_zeros():
    spec = torch.randn(64, 128) + 5.0  # no natural zeros
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        out = spec_augment_freq(spec, generator=g)
        zero_cols = (out == 0).all(0).nonzero().flatten().tolist()
        assert (out == 0).sum() == 64 * len(zero_cols), "masks whole mel bins over all frames"
        if zero_cols:
            assert zero_cols == list(range(zero_cols[0], zero_cols[-1] + 1)), "one contiguous band"
        assert len(zero_cols) < 48
        seen.add(len(zero_cols))
        keep = torch.ones(128, dtype=torch.bool)
        keep[zero_cols] = False
        assert torch.equal(out[:, keep], spec[:, keep])
    assert max(seen) > 20  # lengths spread over [0, 48)
    small = spec_augment_freq(torch.ones(8, 32), generator=torch.Generator().manual_seed(1), max_bins=None)
    assert (small == 0).all(0).sum() < 12  # 48 scaled to 32 bins


def test_mixup_reverses_batch_with_one_lambda():
    batch = {"rgb": torch.arange(4.0).view(4, 1), "spectrogram": torch.arange(4.0).view(4, 1) * 10,
             "label": torch.eye(4), "index": torch.arange(4)}
    out = mixup(batch, 0.7)
    assert torch.allclose(out["rgb"].flatten(), torch.tensor([0.9, 1.3, 1.7, 2.1]))
    assert torch.allclose(out["spectrogram"], out["rgb"] * 10)
    assert torch.allclose(out["label"][0], torch.tensor([0.7, 0, 0, 0.3]))
    assert torch.equal(out["index"], batch["index"])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    lams = [sample_mixup_lambda(0.5, g1) for _ in range(200)]
    assert lams[:5] == [sample_mixup_lambda(0.5, g2) for _ in range(5)]
    assert all(0 <= x <= 1 for x in lams) and 0.35 < sum(lams) / len(lams) < 0.65
    assert sample_mixup_lambda(0.0) == 1.0
