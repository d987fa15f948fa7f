"""The synthetic noise corpus: every kind present, reproducible, with the spectra it claims."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from pretrain.config import ConfigError, load_config
from pretrain.config.corpus import NOISE_KINDS, NoiseSynthConfig
from pretrain.corpus.noise import make_clip, synthesize_noise
from pretrain.utils import PretrainError


def band_power(x: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / 16000)
    return float(spectrum[(freqs >= low) & (freqs < high)].mean())


def test_kinds_have_their_spectra(small_corpus):
    cfg = load_config(NoiseSynthConfig, [], ["out=unused", "clip_seconds=[4.0,4.0]"])
    speech = [sf.read(p, dtype="float32")[0].astype(np.float64)
              for p in sorted(small_corpus.glob("audio/*/*.flac"))[:8]]
    clips = {}
    for i in range(len(NOISE_KINDS)):
        kind, x = make_clip(cfg, i, speech)
        clips[kind] = x.astype(np.float64)
        rms_db = 10 * np.log10(np.mean(x.astype(np.float64) ** 2))
        assert -40.5 <= rms_db <= -19.5, (kind, rms_db)
    assert set(clips) == set(NOISE_KINDS)
    # white: flat; pink: ~10 dB per decade down; brown: ~20 dB per decade
    slope = {k: 10 * np.log10(band_power(clips[k], 4000, 6000) / band_power(clips[k], 400, 600))
             for k in ("white", "pink", "brown")}
    assert abs(slope["white"]) < 1.5 and -13 < slope["pink"] < -7 and -23 < slope["brown"] < -17, slope
    # hum: the power sits at 50 or 60 Hz and its harmonics
    hum = clips["hum"]
    assert max(band_power(hum, 45, 65), band_power(hum, 145, 185)) > 100 * band_power(hum, 1000, 2000)
    # clicks and babble are non-stationary (short-time energy peaks well above its median),
    # white noise is not
    def peak_to_median(x):
        energy = (x[: len(x) // 400 * 400].reshape(-1, 400) ** 2).mean(1)
        return energy.max() / np.median(energy)
    assert peak_to_median(clips["clicks"]) > 10 and peak_to_median(clips["babble"]) > 3
    assert peak_to_median(clips["white"]) < 2


def test_corpus_is_reproducible_and_shards_build(small_corpus, tmp_path):
    args = ["hours=0.01", f"speech={small_corpus}", "seed=4"]
    a = synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={tmp_path / 'a'}", *args]), progress=False)
    b = synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={tmp_path / 'b'}", *args]), progress=False)
    assert a == b and a["clips"] >= 5 and a["seconds"] >= 36
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").glob("*/*.flac"))
    assert len(files) == a["clips"]
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert json.loads((tmp_path / "a/noise.json").read_text())["per_kind"] == a["per_kind"]
    # A rerun of the same config finds its corpus complete and touches nothing; another config is refused.
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={tmp_path / 'a'}", *args]), progress=False) == a
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before
    with pytest.raises(PretrainError, match="not empty"):
        synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={tmp_path / 'a'}", "hours=0.02",
                                                            f"speech={small_corpus}", "seed=4"]), progress=False)
    with pytest.raises(ConfigError, match="kinds"):
        load_config(NoiseSynthConfig, [], ["out=x", "kinds=[thunder]"])
