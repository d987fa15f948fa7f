"""MFCC against kaldi-native-fbank, an independent C++ implementation of Kaldi's features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from pretrain.features.mfcc import deltas, mfcc, mfcc_39
from pretrain.frames import mfcc_num_frames


def kaldi_reference(x: np.ndarray) -> np.ndarray:
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.MfccOptions()
    opts.frame_opts.dither = 0.0  # torchaudio's kaldi.mfcc default, which fairseq uses
    opts.use_energy = False
    opts.mel_opts.num_bins = 23
    opts.num_ceps = 13
    online = knf.OnlineMfcc(opts)
    online.accept_waveform(16000, x.tolist())
    online.input_finished()
    return np.array([online.get_frame(i) for i in range(online.num_frames_ready)]).reshape(-1, 13)


def test_mfcc_matches_kaldi_on_real_speech(tiny_corpus):
    worst = 0.0
    for line in (tiny_corpus / "utterances.jsonl").read_text().splitlines()[:6]:
        utt = json.loads(line)
        x, sr = sf.read(tiny_corpus / utt["audio"], dtype="float32")
        assert sr == 16000
        ours, ref = mfcc(x), kaldi_reference(x)
        assert ours.shape == ref.shape == (mfcc_num_frames(len(x)), 13)
        worst = max(worst, float(np.abs(ours - ref).max() / np.abs(ref).max()))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("n", [0, 399, 400, 401, 559, 560, 16000, 16123])
def test_frame_counts_follow_the_label_formula(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    assert mfcc_39(x).shape == (mfcc_num_frames(n), 39)


def test_deltas_follow_the_regression_formula():
    # Written out with loops and clamped indices, independently of the vectorized version.
    c = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    expected = np.zeros_like(c)
    for t in range(len(c)):
        for n in (1, 2):
            expected[t] += n * (c[min(t + n, len(c) - 1)] - c[max(t - n, 0)])
    np.testing.assert_allclose(deltas(c), expected / 10, rtol=1e-6, atol=1e-7)
    full = mfcc_39(np.random.default_rng(1).standard_normal(8000).astype(np.float32))
    np.testing.assert_allclose(full[:, 13:26], deltas(full[:, :13]), rtol=1e-6)
    np.testing.assert_allclose(full[:, 26:], deltas(deltas(full[:, :13])), rtol=1e-6)
