"""Real recorded speech through the data path: 8 kHz voice prompts of five speakers made into
shards (resampled to 16 kHz, speakers from folder names) and mixed as WavLM mixes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import soxr

from pretrain.data.audio import decode
from pretrain.data.mixing import SPEECH
from pretrain.data.shards import iter_shard, read_manifest

from tests.conftest import RECORDED_SPEECH
from tests.data.test_mixing import measured
from tests.data.test_pipeline import data_cfg, make_loader

pytestmark = pytest.mark.slow


def band_db(audio: np.ndarray, low_hz: float, sr: int = 16000) -> float:
    """Share of the energy at or above low_hz, in dB (Hann-windowed 32 ms frames, half overlap)."""
    n = 512
    frames = np.lib.stride_tricks.sliding_window_view(audio, n)[:: n // 2] * np.hanning(n)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).sum(axis=0)
    return float(10 * np.log10(power[np.fft.rfftfreq(n, 1 / sr) >= low_hz].sum() / power.sum()))


def recorded_utterances(shards):
    for entry in read_manifest(shards)["shards"]:
        for sample in iter_shard(shards / entry["name"]):
            yield json.loads(sample["json"]), decode(sample["flac"])


def test_8khz_recordings_are_resampled_without_images_and_keep_their_band(recorded_speech, recorded_shards):
    speakers = Counter()
    worst_snr, snrs = np.inf, []
    for meta, audio in recorded_utterances(recorded_shards):
        source, sr = sf.read(recorded_speech / meta["source"], dtype="float32")
        assert sr == meta["source_sample_rate"] == 8000 and meta["source_channels"] == 1
        assert len(audio) == meta["num_samples"] == 2 * len(source)
        # An 8 kHz recording has nothing above 4 kHz; a resampler that leaves spectral images
        # (sample repetition, linear interpolation) puts speech there. The test can tell:
        assert band_db(audio, 4200) < -55, meta["source"]
        assert band_db(np.repeat(source, 2), 4200) > -40
        assert band_db(np.interp(np.arange(2 * len(source)) / 2, np.arange(len(source)), source), 4200) > -40
        # Back at 8 kHz it is the recording again, up to the filter's edge near 4 kHz.
        back = soxr.resample(audio, 16000, 8000)[: len(source)]
        snr = 10 * np.log10(np.sum(source.astype(np.float64) ** 2) / np.sum((back - source) ** 2.0))
        snrs.append(snr)
        worst_snr = min(worst_snr, snr)
        speakers[meta["speaker"]] += 1
    assert worst_snr > 20 and np.median(snrs) > 35, (worst_snr, np.median(snrs))
    # Allison's English and Spanish folders are one speaker (speaker_from's regex group).
    assert speakers == {"Allison": 40, "June": 20, "Carlo": 20, "IvrvoiceRU": 20, "Menardi": 20}
    assert str(RECORDED_SPEECH) not in json.dumps(read_manifest(recorded_shards))  # paths relative to the corpus


def test_mixing_real_speech_meets_the_ratios_and_adds_only_speech(recorded_shards):
    base = data_cfg(recorded_shards, "num_workers=2", "labels=[km32]", "mixing.noise_prob=0.0")
    clean = list(make_loader(base))
    mixed = list(make_loader([*base, "mixing.prob=1.0"]))
    ratios = []
    for c, m in zip(clean, mixed, strict=True):
        assert c["keys"] == m["keys"]
        assert np.array_equal(c["labels"]["km32"], m["labels"]["km32"])
        for i, kind in enumerate(m["mixing"].tolist()):
            assert kind == SPEECH
            start, length, ratio = measured(c, m, i)
            n = int(c["lengths"][i])
            assert 1 <= length <= n // 2 and start + length <= n
            assert -5.05 <= ratio <= 5.05, ratio
            ratios.append(ratio)
            # What was added is another 8 kHz recording: nothing above its 4 kHz band, even
            # where the segment fell in a recording's quiet lead-in and was scaled up.
            added = (m["audio"][i, start:start + length] - c["audio"][i, start:start + length]).double().numpy()
            if length >= 4096:
                assert band_db(added, 4200) < -50
    assert len(ratios) >= 100 and np.std(ratios) > 1.5  # every utterance, ratios spread over the range
