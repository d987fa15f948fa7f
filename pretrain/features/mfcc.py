"""39-dimensional MFCC as HuBERT's first iteration computes them.

fairseq's ``dump_mfcc_feature.py`` calls ``torchaudio.compliance.kaldi.mfcc(x,
sample_frequency=16000, use_energy=False)`` on the waveform as floats in [-1, 1], then appends
``compute_deltas`` of the coefficients and ``compute_deltas`` of those. This module computes the
same thing in numpy (no torchaudio here), with Kaldi's definitions:

- framing: 25 ms windows (400 samples) every 10 ms (160), ``snip_edges=true``, so
  ``1 + (n - 400) // 160`` frames (``pretrain.frames.mfcc_num_frames``); no dither;
- per frame: remove the DC offset, pre-emphasis 0.97 (``x[0] -= 0.97 x[0]``), the "povey"
  window ``(0.5 - 0.5 cos(2 pi i / 399)) ** 0.85``, zero-padding to 512, power spectrum;
- 23 triangular mel filters between 20 Hz and 8 kHz on Kaldi's mel scale
  ``1127 ln(1 + f / 700)``, built over FFT bins 0..255 (the Nyquist bin gets no weight);
- log of the filter energies floored at float32 epsilon; orthonormal DCT-II, first 13
  coefficients (C0 kept: ``use_energy=false``); cepstral lifter
  ``1 + 11 sin(pi i / 22)``;
- deltas with a window of 2: ``d[t] = sum_n n (c[t+n] - c[t-n]) / 10``, edges replicated;
  delta-deltas are the deltas of the deltas (as fairseq does, rather than Kaldi's 9-tap filter).

Checked against kaldi-native-fbank, an independent C++ implementation of Kaldi's MFCC
(``tests/features/test_mfcc.py``).
"""

from __future__ import annotations

import numpy as np

from pretrain.frames import MFCC_HOP, MFCC_WINDOW, mfcc_num_frames
from pretrain.kaldi import EPS, FFT_SIZE, PREEMPHASIS, WINDOW, mel_banks

NUM_CEPS = 13
NUM_MEL_BINS = 23
CEPSTRAL_LIFTER = 22.0
DIM = 3 * NUM_CEPS


def _dct() -> np.ndarray:
    """(NUM_CEPS, NUM_MEL_BINS) orthonormal DCT-II rows, as Kaldi's ComputeDctMatrix."""
    n = np.arange(NUM_MEL_BINS)
    k = np.arange(NUM_CEPS)[:, None]
    dct = np.sqrt(2.0 / NUM_MEL_BINS) * np.cos(np.pi / NUM_MEL_BINS * (n + 0.5) * k)
    dct[0] = np.sqrt(1.0 / NUM_MEL_BINS)
    return dct


_BANKS = mel_banks(NUM_MEL_BINS)
_DCT = _dct()
_LIFTER = 1.0 + 0.5 * CEPSTRAL_LIFTER * np.sin(np.pi * np.arange(NUM_CEPS) / CEPSTRAL_LIFTER)


def mfcc(waveform: np.ndarray) -> np.ndarray:
    """(frames, 13) Kaldi MFCC of a 16 kHz waveform in [-1, 1]."""
    x = np.asarray(waveform, dtype=np.float64).reshape(-1)
    frames = mfcc_num_frames(len(x))
    if frames == 0:
        return np.zeros((0, NUM_CEPS), dtype=np.float32)
    idx = np.arange(MFCC_WINDOW)[None, :] + MFCC_HOP * np.arange(frames)[:, None]
    f = x[idx]
    f = f - f.mean(axis=1, keepdims=True)
    f = np.concatenate([f[:, :1] * (1 - PREEMPHASIS), f[:, 1:] - PREEMPHASIS * f[:, :-1]], axis=1)
    f = f * WINDOW
    power = np.abs(np.fft.rfft(f, n=FFT_SIZE, axis=1)) ** 2
    logmel = np.log(np.maximum(power @ _BANKS.T, EPS))
    return ((logmel @ _DCT.T) * _LIFTER).astype(np.float32)


def deltas(c: np.ndarray, window: int = 2) -> np.ndarray:
    """``sum_n n (c[t+n] - c[t-n]) / (2 sum n^2)`` over time with replicated edges."""
    if len(c) == 0:
        return c.copy()
    padded = np.concatenate([np.repeat(c[:1], window, 0), c, np.repeat(c[-1:], window, 0)])
    t = len(c)
    out = sum(n * (padded[window + n:window + n + t] - padded[window - n:window - n + t])
              for n in range(1, window + 1))
    return (out / (2 * sum(n * n for n in range(1, window + 1)))).astype(np.float32)


def mfcc_39(waveform: np.ndarray) -> np.ndarray:
    """(frames, 39): MFCC, deltas and delta-deltas, HuBERT iteration 1's features."""
    c = mfcc(waveform)
    d = deltas(c)
    return np.concatenate([c, d, deltas(d)], axis=1)
