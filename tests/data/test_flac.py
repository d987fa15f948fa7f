"""libFLAC decoding (pretrain.data.flac) against soundfile's, on real speech."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import soundfile as sf

from pretrain.data import flac
from pretrain.data.audio import encode

pytestmark = pytest.mark.skipif(not flac.available(), reason="no libFLAC shared library")


@pytest.fixture(scope="module")
def speech(tiny_corpus) -> list[np.ndarray]:
    """The tiny corpus's utterances (11 voices) as float32, as the shards hold them."""
    records = [json.loads(line) for line in (tiny_corpus / "utterances.jsonl").read_text().splitlines()]
    return [sf.read(tiny_corpus / r["audio"], dtype="float32")[0] for r in records if r.get("ok", True)]


def reference(data: bytes, start: int, frames: int, dtype: str) -> np.ndarray:
    return sf.read(io.BytesIO(data), dtype=dtype, start=start, frames=frames)[0]


def test_whole_utterances_and_crops_equal_soundfile(speech):
    rng = np.random.default_rng(0)
    for audio in speech:
        data = encode(audio, "flac")
        assert flac.num_samples(data) == len(audio)
        out = np.empty(len(audio), dtype=np.float32)
        flac.decode_into(data, 0, out)
        np.testing.assert_array_equal(out, audio)
        # Crops that start mid-frame, end mid-frame, span frames, or end at the last sample.
        for start, frames in [(int(rng.integers(len(audio) - 400)), 400), (4096, 4096), (4095, 2),
                              (len(audio) - 1000, 1000), (int(rng.integers(1, len(audio) // 2)), len(audio) // 2)]:
            for dtype in ("float32", "int16"):
                out = np.full(frames, 7, dtype=dtype)
                flac.decode_into(data, start, out)
                np.testing.assert_array_equal(out, reference(data, start, frames, dtype))


def test_a_frame_that_does_not_decode_starts_over_from_the_first(speech, monkeypatch):
    """Where the frame found for a crop is not one (or none is found), the stream is decoded
    from its start: the same samples, and the restart is reported for the metrics."""
    audio = speech[2]
    data = encode(audio, "flac")
    start, frames = 3 * 4096 + 77, 5000
    cb, _ = flac._callbacks()
    real = cb.frame_offset(np.frombuffer(data, np.uint8), *flac._layout(data)[:1], 3, flac._layout(data)[2])
    for wrong in (real + 100, -1):  # mid-frame bytes; no frame found
        monkeypatch.setattr(cb, "frame_offset", lambda *args, wrong=wrong: wrong)
        out = np.empty(frames, dtype=np.float32)
        assert flac.decode_into(data, start, out) == 1
        np.testing.assert_array_equal(out, audio[start:start + frames])
    monkeypatch.undo()
    assert flac.decode_into(data, start, out) == 0


def test_rows_of_a_padded_batch_are_written_in_place(speech):
    data = encode(speech[0], "flac")
    batch = np.full((2, 5000), -1.0, dtype=np.float32)
    flac.decode_into(data, 320, batch[1, :3000])
    np.testing.assert_array_equal(batch[1, :3000], speech[0][320:3320])
    assert (batch[0] == -1.0).all() and (batch[1, 3000:] == -1.0).all()
    with pytest.raises(TypeError, match="contiguous 1-D"):
        flac.decode_into(data, 0, batch[:, 0])
    with pytest.raises(TypeError, match="float64"):
        flac.decode_into(data, 0, np.empty(10))


def test_damaged_and_foreign_streams_are_errors_that_say_why(speech):
    audio = speech[1]
    data = encode(audio, "flac")
    out = np.empty(len(audio), dtype=np.float32)
    # Cut mid-frame, libFLAC loses sync in the last frame; cut at a frame, the samples run short.
    with pytest.raises(ValueError, match=rf"(lost sync after \d+ of|decoded \d+ samples from 0, expected) "
                                         rf"{len(audio)}"):
        flac.decode_into(data[: len(data) // 2], 0, out)
    damaged = bytearray(data)
    damaged[len(data) // 2: len(data) // 2 + 8] = bytes(8)
    with pytest.raises(ValueError, match="libFLAC: (frame CRC mismatch|lost sync|bad frame header|unparseable)"):
        flac.decode_into(bytes(damaged), 0, out)
    with pytest.raises(ValueError, match=f"samples {len(audio) + 10}..{len(audio) + 15} asked for, but the "
                                         f"stream holds {len(audio)}"):
        flac.decode_into(data, len(audio) + 10, np.empty(5, dtype=np.float32))
    for rate, channels, subtype, said in [(8000, 1, "PCM_16", "8000 Hz, 1 channels, 16-bit"),
                                          (16000, 2, "PCM_16", "16000 Hz, 2 channels, 16-bit"),
                                          (16000, 1, "PCM_24", "16000 Hz, 1 channels, 24-bit")]:
        buf = io.BytesIO()
        sf.write(buf, np.tile(audio[:8000, None], (1, channels)), rate, format="FLAC", subtype=subtype)
        with pytest.raises(ValueError, match=f"expected 16 kHz mono 16-bit FLAC, got {said}"):
            flac.decode_into(buf.getvalue(), 0, np.empty(100, dtype=np.float32))
    with pytest.raises(ValueError, match="not a FLAC stream"):
        flac.num_samples(b"RIFF" + bytes(60))


def test_each_thread_decodes_with_its_own_decoder(speech):
    datas = [encode(a, "flac") for a in speech]
    results: dict[int, list[np.ndarray]] = {}

    def work(t: int) -> None:
        outs = []
        for _ in range(3):
            for data, audio in zip(datas, speech):
                out = np.empty(len(audio), dtype=np.float32)
                flac.decode_into(data, 0, out)
                outs.append(out)
        results[t] = outs

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for outs in results.values():
        for out, audio in zip(outs, speech * 3):
            np.testing.assert_array_equal(out, audio)
    assert len(results) == 3


def test_version_names_the_library():
    assert flac.version().startswith("1.")
    assert flac.describe().startswith(f"libFLAC {flac.version()} (libFLAC")


def test_without_numba_flac_goes_to_soundfile(monkeypatch):
    monkeypatch.setattr(flac, "_callbacks", lambda: None)
    assert not flac.available()
    assert flac.describe().startswith("soundfile (numba is not importable")


@pytest.fixture(scope="module")
def many_lengths(tmp_path_factory) -> list[bytes]:
    """FLAC files of real speech from every engine and voice, as the shards encode them: the
    demo corpus's first 320 utterances (1-3 clauses; number 302 is the one in which libFLAC
    1.4.2's seek failed for crops in its frames 14 and 15), 32 of them cut to 0.2-1 s, and 20
    joined six at a time into 15-25 s recordings."""
    from tests.conftest import synthesize_test_corpus

    corpus = synthesize_test_corpus("demo320", tmp_path_factory.mktemp("demo320"))
    records = [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    speech = [sf.read(corpus / r["audio"], dtype="float32")[0] for r in records if r.get("ok", True)]
    rng = np.random.default_rng(5)
    short = [a[: int(rng.integers(3200, 16000))] for a in speech[::10]]
    long = [np.concatenate(speech[i:i + 6]) for i in range(0, 120, 6)]
    files = [encode(a, "flac") for a in speech + short + long]
    seconds = [flac.num_samples(d) / 16000 for d in files]
    assert len(files) >= 350 and min(seconds) < 1.0 and max(seconds) > 15.0
    return files


@pytest.mark.slow
def test_every_crop_of_many_files_equals_soundfile(many_lengths):
    """The property the data workers rely on: any crop of any valid file decodes, and to
    soundfile's samples bit for bit. Offsets on a grid of 1,601 samples (not a divisor of the
    4,096-sample frames, so every position within a frame is met) and at every frame boundary
    and either side of it, 16,000 samples long or to the end, float32 and int16."""
    crops = 0
    for data in many_lengths:
        reference = {dtype: sf.read(io.BytesIO(data), dtype=dtype)[0] for dtype in ("float32", "int16")}
        total = len(reference["int16"])
        starts = {*range(0, total, 1601), *(b + d for b in range(4096, total, 4096) for d in (-1, 0, 1))}
        for start in sorted(s for s in starts if s < total):
            frames = min(16000, total - start)
            for dtype, ref in reference.items():
                out = np.empty(frames, dtype=dtype)
                assert flac.decode_into(data, start, out) == 0
                if not np.array_equal(out, ref[start:start + frames]):
                    raise AssertionError(f"{dtype} crop {start}..{start + frames} of a {total}-sample file differs")
                crops += 1
    assert crops > 40_000
