"""pretrain.data.audio: the three decoding paths (numpy for WAV, libFLAC, soundfile) agree."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf

from pretrain.data import audio as audio_mod
from pretrain.data import flac
from pretrain.data.audio import _decode_into_soundfile, decode, decode_into, decode_soundfile, encode, num_samples


@pytest.fixture(scope="module")
def utterance(tiny_corpus) -> np.ndarray:
    record = json.loads((tiny_corpus / "utterances.jsonl").read_text().splitlines()[0])
    return sf.read(tiny_corpus / record["audio"], dtype="float32")[0]


def wav_bytes(audio: np.ndarray, rate: int = 16000, subtype: str = "PCM_16", extensible: bool = False,
              extra_chunk: bytes = b"") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV" if not extensible else "WAVEX", subtype=subtype)
    data = buf.getvalue()
    if extra_chunk:  # an odd-sized chunk (padded to even) before the samples, as some tools write
        at = data.index(b"data")
        chunk = b"LIST" + len(extra_chunk).to_bytes(4, "little") + extra_chunk + b"\0" * (len(extra_chunk) & 1)
        data = data[:at] + chunk + data[at:]
        data = data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:]
    return data


@pytest.mark.parametrize("variant", ["plain", "extensible", "extra_chunk"])
def test_wav_is_read_by_numpy_exactly_as_soundfile_reads_it(utterance, variant):
    data = wav_bytes(utterance, extensible=variant == "extensible",
                     extra_chunk=b"INFOodd" if variant == "extra_chunk" else b"")
    assert audio_mod._pcm16_wav(data) is not None  # the numpy path, not the fallback
    assert num_samples(data) == len(utterance)
    np.testing.assert_array_equal(decode(data), decode_soundfile(data))
    for start, frames in [(0, len(utterance)), (320, 1000), (len(utterance) - 7, 7)]:
        for dtype in (np.float32, np.int16):
            ours, theirs = np.empty(frames, dtype), np.empty(frames, dtype)
            decode_into(data, start, ours)
            _decode_into_soundfile(data, start, theirs)
            np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match=f"decoded 7 samples from {len(utterance) - 7}, expected 8"):
        decode_into(data, len(utterance) - 7, np.empty(8, np.float32))


def test_other_wavs_go_to_soundfile_which_names_the_format(utterance):
    for data in (wav_bytes(utterance[:8000], rate=8000), wav_bytes(np.stack([utterance] * 2, 1))):
        assert audio_mod._pcm16_wav(data) is None
        with pytest.raises(ValueError, match="expected 16 kHz mono"):
            decode_into(data, 0, np.empty(100, np.float32))
    data = wav_bytes(utterance, subtype="PCM_24")  # 24-bit: soundfile reads it, to the same floats
    assert audio_mod._pcm16_wav(data) is None
    out = np.empty(len(utterance), np.float32)
    decode_into(data, 0, out)
    np.testing.assert_array_equal(out, utterance)
    # A cut data chunk holds what is there, as libsndfile reads it.
    cut = wav_bytes(utterance)[: 44 + 2 * 1000]
    assert num_samples(cut) == 1000
    np.testing.assert_array_equal(decode(cut), decode_soundfile(cut))


def test_flac_without_libflac_decodes_in_soundfile_to_the_same_samples(utterance, monkeypatch):
    data = encode(utterance, "flac")
    with_libflac = np.empty(5000, np.float32)
    decode_into(data, 640, with_libflac)
    monkeypatch.setattr(flac, "available", lambda: False)
    without = np.empty(5000, np.float32)
    decode_into(data, 640, without)
    np.testing.assert_array_equal(with_libflac, without)
    np.testing.assert_array_equal(without, utterance[640:5640])


def test_flac_without_a_sample_count_is_refused_by_name(utterance):
    data = bytearray(encode(utterance, "flac"))
    data[21] &= 0xF0  # STREAMINFO's 36-bit total sample count, zeroed: "unknown"
    data[22:26] = bytes(4)
    assert num_samples(bytes(data)) is None
    with pytest.raises(ValueError, match="FLAC stream without a sample count"):
        decode(bytes(data))
    out = np.empty(1000, np.float32)  # the pipeline takes the count from the sample's metadata
    decode_into(bytes(data), 320, out)
    np.testing.assert_array_equal(out, utterance[320:1320])
