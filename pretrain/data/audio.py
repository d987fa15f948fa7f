"""Reading, checking, encoding and decoding audio: one place for the rules every stage shares."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from pretrain.data import flac
from pretrain.frames import SAMPLE_RATE

# Below this peak the audio is digital silence once quantized to 16 bits.
SILENCE_PEAK = 0.5 / 32768.0
EXTENSIONS = {"flac": ".flac", "wav": ".wav"}


class BadAudio(ValueError):
    """Audio that must be left out of the shards; the message is the reason in the report."""


def load_mono_16k(path: str, min_duration: float) -> tuple[np.ndarray, int, int]:
    """Read any soundfile-readable file as float32 mono at 16 kHz.

    Returns ``(audio, original_sample_rate, original_channels)``; raises ``BadAudio`` for
    unreadable, empty, too short, non-finite or silent audio.
    """
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types
        raise BadAudio(f"unreadable: {e}") from None
    channels = audio.shape[1]
    if audio.shape[0] == 0:
        raise BadAudio("empty: no samples")
    if not np.all(np.isfinite(audio)):
        raise BadAudio("non-finite samples (NaN or inf)")
    audio = audio.mean(axis=1) if channels > 1 else audio[:, 0]
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if len(audio) < min_duration * SAMPLE_RATE:
        raise BadAudio(f"too short: {len(audio) / SAMPLE_RATE:.3f} s < min_duration {min_duration} s")
    if float(np.max(np.abs(audio))) < SILENCE_PEAK:
        raise BadAudio("silent: every sample is zero at 16-bit resolution")
    return audio, sr, channels


def encode(audio: np.ndarray, fmt: str) -> bytes:
    """16-bit FLAC or WAV bytes of float audio in [-1, 1] (clipped)."""
    # x 32768 inverts soundfile's int16 -> float scaling exactly, so re-encoding is lossless.
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """float32 mono samples of FLAC/WAV bytes as stored in the shards."""
    n = num_samples(data)
    if n is None and data[:4] == b"fLaC":
        # libsndfile cannot size such a stream either; the shards' encoder always writes it.
        raise ValueError("FLAC stream without a sample count in its STREAMINFO")
    if n is None:
        return decode_soundfile(data)
    out = np.empty(n, dtype=np.float32)
    decode_into(data, 0, out)
    return out


def num_samples(data: bytes) -> int | None:
    """The sample count a FLAC or 16-bit WAV header gives, or None where it gives none."""
    if data[:4] == b"fLaC":
        return flac.num_samples(data)
    wav = _pcm16_wav(data)
    return None if wav is None else wav[1]


def decode_into(data: bytes, start: int, out: np.ndarray) -> int:
    """Decode samples ``[start, start + len(out))`` of FLAC/WAV bytes straight into the row
    ``out`` of the padded batch (no intermediate array, no copy): int16, or float32 scaled by
    1/32768 as libsndfile does for 16-bit audio.

    16 kHz mono 16-bit WAV is read by numpy from its header (no decoder), FLAC by libFLAC
    itself (``pretrain.data.flac``); anything else, or FLAC without libFLAC, by soundfile. All
    three give the same samples (tested). Returns how often decoding had to start over from
    the stream's first frame (``flac.decode_into``; 0 for the other paths), for the metrics.
    """
    if data[:4] == b"fLaC" and flac.available():
        return flac.decode_into(data, start, out)
    wav = _pcm16_wav(data)
    if wav is None:
        _decode_into_soundfile(data, start, out)
        return 0
    offset, total = wav
    if start + len(out) > total:
        raise ValueError(f"decoded {max(0, total - start)} samples from {start}, expected {len(out)}")
    pcm = np.frombuffer(data, dtype="<i2", count=len(out), offset=offset + 2 * start)
    if out.dtype == np.int16:
        out[:] = pcm
    else:
        np.multiply(pcm, np.float32(1.0 / 32768.0), out=out)
    return 0


def _pcm16_wav(data: bytes) -> tuple[int, int] | None:
    """(byte offset, sample count) of the samples of a 16 kHz mono 16-bit PCM WAV; None for
    any other bytes, which soundfile then decodes (or rejects with its own message)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt_ok = 12, False
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            tag, channels, rate = (int.from_bytes(data[body:body + 2], "little"),
                                   int.from_bytes(data[body + 2:body + 4], "little"),
                                   int.from_bytes(data[body + 4:body + 8], "little"))
            bits = int.from_bytes(data[body + 14:body + 16], "little")
            if tag == 0xFFFE and size >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat's tag
                tag = int.from_bytes(data[body + 24:body + 26], "little")
            fmt_ok = tag == 1 and channels == 1 and rate == SAMPLE_RATE and bits == 16
        elif chunk == b"data":
            # A data chunk cut short (a damaged shard) holds what is there, as libsndfile reads it.
            return (body, min(size, len(data) - body) // 2) if fmt_ok else None
        pos = body + size + (size & 1)  # chunks are padded to an even length
    return None


def decode_soundfile(data: bytes) -> np.ndarray:
    """``decode`` through soundfile alone: the reference the faster paths are tested against."""
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    if sr != SAMPLE_RATE or audio.ndim != 1:
        raise ValueError(f"expected 16 kHz mono, got {sr} Hz with shape {audio.shape}")
    return audio


def _decode_into_soundfile(data: bytes, start: int, out: np.ndarray) -> None:
    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.samplerate != SAMPLE_RATE or f.channels != 1:
            raise ValueError(f"expected 16 kHz mono, got {f.samplerate} Hz with {f.channels} channels")
        if start:
            f.seek(start)
        got = len(f.read(len(out), dtype=out.dtype.name, out=out))
    if got != len(out):
        raise ValueError(f"decoded {got} samples from {start}, expected {len(out)}")
