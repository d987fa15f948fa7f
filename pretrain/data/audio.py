"""Reading, checking, encoding and decoding audio: one place for the rules every stage shares."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

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
    return decode_int16(data).astype(np.float32) / 32768.0


def decode_int16(data: bytes, start: int = 0, frames: int = -1) -> np.ndarray:
    """int16 mono samples ``[start, start + frames)`` of FLAC/WAV bytes as stored in the shards.

    The cheapest decode: a crop is decoded alone (FLAC seeks), and the pipeline converts whole
    padded batches to float at once.
    """
    audio, sr = sf.read(io.BytesIO(data), dtype="int16", start=start, frames=frames)
    if sr != SAMPLE_RATE or audio.ndim != 1:
        raise ValueError(f"expected 16 kHz mono, got {sr} Hz with shape {audio.shape}")
    return audio


def decode_into(data: bytes, start: int, out: np.ndarray) -> None:
    """Decode samples ``[start, start + len(out))`` of FLAC/WAV bytes straight into the row
    ``out`` of the padded batch (no intermediate array, no copy): int16, or float32 scaled by
    1/32768 as libsndfile does for 16-bit audio."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.samplerate != SAMPLE_RATE or f.channels != 1:
            raise ValueError(f"expected 16 kHz mono, got {f.samplerate} Hz with {f.channels} channels")
        if start:
            f.seek(start)
        got = len(f.read(len(out), dtype=out.dtype.name, out=out))
    if got != len(out):
        raise ValueError(f"decoded {got} samples from {start}, expected {len(out)}")
