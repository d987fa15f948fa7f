"""Kaldi's spectral analysis, shared by the MFCC features (``pretrain.features.mfcc``) and the
model's Fbank front end (``pretrain.model.fbank``): 25 ms "povey" windows every 10 ms
(``pretrain.frames``), pre-emphasis 0.97, a 512-point FFT, and triangular filters on Kaldi's
mel scale ``1127 ln(1 + f / 700)`` from 20 Hz to 8 kHz. A ground-floor module: features and
model both build on it, and neither imports the other for it.
"""

from __future__ import annotations

import numpy as np

from pretrain.frames import MFCC_WINDOW, SAMPLE_RATE

FFT_SIZE = 512
LOW_FREQ = 20.0
PREEMPHASIS = 0.97
WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(MFCC_WINDOW) / (MFCC_WINDOW - 1))) ** 0.85
EPS = float(np.finfo(np.float32).eps)
"""Floor of the filter energies before the log (float32 epsilon, as Kaldi)."""


def _mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_banks(num_bins: int) -> np.ndarray:
    """(num_bins, FFT_SIZE // 2 + 1) Kaldi triangular filters, built over FFT bins 0..255 (the
    Nyquist column stays zero): 23 for the MFCC, more for the Fbank front end."""
    num_fft_bins = FFT_SIZE // 2
    mel_low, mel_high = _mel(LOW_FREQ), _mel(SAMPLE_RATE / 2)
    delta = (mel_high - mel_low) / (num_bins + 1)
    mels = _mel(np.arange(num_fft_bins) * SAMPLE_RATE / FFT_SIZE)
    banks = np.zeros((num_bins, num_fft_bins + 1))
    for b in range(num_bins):
        left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        up = (mels - left) / (center - left)
        down = (right - mels) / (right - center)
        inside = (mels > left) & (mels < right)
        banks[b, :num_fft_bins] = np.where(inside, np.where(mels <= center, up, down), 0.0)
    return banks
