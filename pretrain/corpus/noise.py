"""``pretrain corpus noise``: synthetic noise clips for WavLM's noise mixing.

Seven kinds, so that mixing meets stationary and non-stationary, broadband and tonal noise:
coloured noise (white, pink, brown), babble (several talkers of a speech corpus overlapped),
mains hum with harmonics, sparse clicks, and a machine-like amplitude-modulated band noise.
Clip i is a pure function of (seed, i); the output is a plain folder of FLAC files that
``pretrain shards build`` packs like any other corpus.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from pretrain.config.corpus import CorpusSynthConfig, NoiseSynthConfig
from pretrain.config.core import same_job, write_run_record
from pretrain.corpus.synth import synthesize_corpus
from pretrain.frames import SAMPLE_RATE
from pretrain.utils import PretrainError, atomic_write_json

log = logging.getLogger(__name__)

SUMMARY = "noise.json"


def coloured(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1]  # no infinite DC gain
    spectrum *= freqs ** (-exponent / 2.0)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.995, 1.005)
    out = np.zeros(n)
    for h in range(1, 9):  # odd harmonics dominate a transformer's buzz
        amp = rng.uniform(0.2, 1.0) / h * (1.0 if h % 2 else 0.4)
        out += amp * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
    return out + 0.02 * coloured(rng, n, 1.0) / 0.1


def clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    out = 0.01 * rng.standard_normal(n)
    rate = rng.uniform(2.0, 20.0)  # clicks per second
    for pos in np.flatnonzero(rng.random(n) < rate / SAMPLE_RATE):
        length = int(rng.integers(40, 400))
        ring = rng.uniform(500, 4000)
        t = np.arange(min(length, n - pos)) / SAMPLE_RATE
        out[pos:pos + len(t)] += rng.uniform(0.3, 1.0) * np.exp(-t * rng.uniform(200, 2000)) \
            * np.sin(2 * np.pi * ring * t)
    return out


def machine(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    centre, width = rng.uniform(100, 2000), rng.uniform(50, 400)
    spectrum *= np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    band = np.fft.irfft(spectrum, n)
    t = np.arange(n) / SAMPLE_RATE
    am = 1.0 + rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * rng.uniform(2, 30) * t)
    return band * am


def babble(rng: np.random.Generator, n: int, speech: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(n)
    for _ in range(int(rng.integers(4, 9))):
        utt = speech[int(rng.integers(len(speech)))]
        utt = utt / (np.sqrt(np.mean(utt ** 2)) + 1e-9) * rng.uniform(0.5, 1.0)
        start = int(rng.integers(-len(utt) // 2, n))  # talkers start and stop at random
        lo, hi = max(start, 0), min(start + len(utt), n)
        if hi > lo:
            out[lo:hi] += utt[lo - start:hi - start]
    return out


def make_clip(cfg: NoiseSynthConfig, index: int, speech: list[np.ndarray] | None) -> tuple[str, np.ndarray]:
    """(kind, float32 samples) of clip ``index``."""
    rng = np.random.default_rng([cfg.seed, index])
    kind = cfg.kinds[index % len(cfg.kinds)]
    n = int(rng.uniform(*cfg.clip_seconds) * SAMPLE_RATE)
    if kind in ("white", "pink", "brown"):
        x = coloured(rng, n, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind])
    elif kind == "hum":
        x = hum(rng, n)
    elif kind == "clicks":
        x = clicks(rng, n)
    elif kind == "machine":
        x = machine(rng, n)
    else:
        x = babble(rng, n, speech)
    rms = np.sqrt(np.mean(x ** 2))
    level = 10 ** (rng.uniform(*cfg.level_dbfs) / 20.0)
    x = x / max(rms, 1e-12) * level
    return kind, np.clip(x, -1.0, 1.0).astype(np.float32)


def _speech_for_babble(cfg: NoiseSynthConfig, tmp: Path) -> list[np.ndarray]:
    if cfg.speech:
        corpus = Path(cfg.speech)
        manifest = corpus / "utterances.jsonl"
        if not manifest.is_file():
            raise PretrainError(f"speech corpus {corpus} has no utterances.jsonl (make one with "
                                "pretrain corpus synth, or leave 'speech' unset)")
    else:
        corpus = tmp / "babble_speech"
        synthesize_corpus(CorpusSynthConfig(out=str(corpus), count=cfg.babble_utterances, seed=cfg.seed + 1),
                          progress=False, argv=["pretrain corpus noise (babble source)"])
    records = [json.loads(line) for line in (corpus / "utterances.jsonl").read_text().splitlines()]
    if not records:
        raise PretrainError(f"speech corpus {corpus} holds no utterances for the babble")
    return [sf.read(corpus / r["audio"], dtype="float32")[0].astype(np.float64) for r in records[:64]]


def synthesize_noise(cfg: NoiseSynthConfig, progress: bool = True, argv: list[str] | None = None) -> dict:
    """Write the noise corpus of ``cfg``; returns the summary written to ``noise.json``."""
    out = Path(cfg.out)
    if (out / SUMMARY).is_file() and same_job(out, cfg):
        log.info("noise corpus %s: already synthesized with this config; nothing to do", out)
        return json.loads((out / SUMMARY).read_text())
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise PretrainError(f"noise output {out} is not empty; choose another 'out' or set overwrite=true")
        for kind_dir in out.iterdir():
            if kind_dir.is_dir():
                shutil.rmtree(kind_dir)
        (out / SUMMARY).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, cfg, argv)
    target = cfg.hours * 3600.0
    total, clips, per_kind = 0.0, 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        speech = _speech_for_babble(cfg, Path(tmp)) if "babble" in cfg.kinds else None
        bar = tqdm(total=int(round(target)), unit="audio-s", desc="noise", disable=not progress)
        while total < target:
            kind, x = make_clip(cfg, clips, speech)
            path = out / kind / f"noise-{clips:06d}.flac"
            path.parent.mkdir(exist_ok=True)
            partial = path.with_name(path.name + ".tmp")  # not .flac: never read as a clip
            sf.write(partial, x, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            partial.replace(path)
            clips += 1
            total += len(x) / SAMPLE_RATE
            per_kind[kind] = per_kind.get(kind, 0) + 1
            bar.update(int(total) - bar.n)
        bar.close()
    summary = {"kind": "pretrain-synthetic-noise", "clips": clips, "seconds": round(total, 3),
               "per_kind": per_kind, "seed": cfg.seed}
    atomic_write_json(out / SUMMARY, summary)
    log.info("noise corpus %s: %d clips, %.1f min", out, clips, total / 60)
    return summary
