"""``pretrain corpus synth``: a multi-voice English speech corpus with exact phone alignments.

Data flow: utterance ``i`` is fully described by ``(seed, i)`` -> voice (round-robin), text,
speaking rate, edge silences and dither. Utterances are synthesized in fixed chunks of
``chunk_size`` indices, each chunk in a fresh worker process (espeak-ng keeps state between
calls, so a chunk's output is bit-identical only if it starts from a fresh library); the
chunk boundaries do not depend on ``jobs``, so neither does the corpus. Workers write audio and
alignments; the parent collects the records in index order and writes the manifests last.

Layout of ``out``::

    audio/<voice>/<voice>_<index>.flac   16 kHz mono, 16-bit FLAC
    align/<voice>/<voice>_<index>.json   phone segments (samples) and frame labels (100, 50 Hz)
    utterances.jsonl                     one record per utterance, in index order
    failures.jsonl                       utterances that could not be synthesized, with reasons
    corpus.json                          format version, phone inventory, voices, totals
    config.yaml, run.json                resolved config and provenance (written first)
    overview.png                         one spectrogram per engine with its phones; durations

``corpus.json`` is written last, atomically: its presence marks a complete corpus.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from pretrain.config import write_run_record
from pretrain.config.core import same_job
from pretrain.config.corpus import CorpusSynthConfig
from pretrain.corpus import engines
from pretrain.corpus.engines import VOICES, RawUtterance, Request, SynthesisError
from pretrain.phones import PHONE_ID, PHONES, SILENCE
from pretrain.corpus.plot import plot_overview
from pretrain.corpus.text import sentence
from pretrain.frames import SAMPLE_RATE, segment_frame_labels
from pretrain.utils import PretrainError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PRIOR_SECONDS_PER_UTTERANCE = 7.0  # mean of the default grammar (3 clauses) over the voices
LABEL_RATES = (100, 50)


@dataclass(frozen=True)
class Plan:
    """What utterance ``index`` is, derived from the seed alone."""

    index: int
    voice: str
    text: str
    stretch: float
    lead: float
    trail: float
    noise_seed: int

    @property
    def utt_id(self) -> str:
        return f"{self.voice}_{self.index:07d}"


def plan_utterance(cfg: CorpusSynthConfig, index: int) -> Plan:
    rng = np.random.default_rng([cfg.seed, index])
    text = sentence(rng, cfg.max_clauses)
    stretch = cfg.stretch * float(rng.uniform(1 - cfg.rate_jitter, 1 + cfg.rate_jitter))
    lo, hi = cfg.edge_silence
    lead, trail = (float(x) for x in rng.uniform(lo, hi, size=2))
    return Plan(index, cfg.voices[index % len(cfg.voices)], text, stretch, lead, trail,
                int(rng.integers(2**63)))


# --------------------------------------------------------------------------- one utterance


def finalize(raw: RawUtterance, plan: Plan, dither: float) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Resample to 16 kHz, put the labels on the audio, add edge silence and dither.

    Returns int16 samples and contiguous (phone, start, end) segments in samples whose first
    and last phones are silence and whose last end is the number of samples.
    """
    audio = raw.audio.astype(np.float32)
    if raw.sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, raw.sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    n = len(audio)
    if n == 0:
        raise SynthesisError("engine produced no audio")
    if not np.all(np.isfinite(audio)) or np.max(np.abs(audio)) < 1e-3:
        raise SynthesisError("engine produced silent or non-finite audio")
    offset = VOICES[plan.voice].label_offset
    segments: list[list] = []
    for phone, start, end in raw.segments:
        # Labels are clipped to the audio: some voices label past the end, others stop short.
        s = min(max(int(round((start + offset) * SAMPLE_RATE)), 0), n)
        e = min(max(int(round((end + offset) * SAMPLE_RATE)), 0), n)
        if e <= s:
            continue
        if segments and segments[-1][0] == phone == SILENCE:
            segments[-1][2] = e
        else:
            segments.append([phone, s, e])
    if not any(p != SILENCE for p, _, _ in segments):
        raise SynthesisError("no phones left after aligning labels to the audio")

    lead = int(round(plan.lead * SAMPLE_RATE))
    trail = int(round(plan.trail * SAMPLE_RATE))
    total = lead + n + trail
    shifted: list[list] = [[SILENCE, 0, lead]]
    for phone, s, e in segments:
        s, e = s + lead, e + lead
        if s > shifted[-1][2]:  # a gap before the first label is silence
            shifted.append([SILENCE, shifted[-1][2], s])
        if phone == SILENCE and shifted[-1][0] == SILENCE:
            shifted[-1][2] = e
        else:
            shifted.append([phone, shifted[-1][2], e])
    if shifted[-1][0] == SILENCE:
        shifted[-1][2] = total
    else:
        shifted.append([SILENCE, shifted[-1][2], total])

    padded = np.zeros(total, dtype=np.float64)
    padded[lead:lead + n] = audio
    padded += np.random.default_rng(plan.noise_seed).normal(0.0, dither, size=total)
    pcm = np.clip(np.round(padded * 32768.0), -32768, 32767).astype(np.int16)
    return pcm, [(p, int(s), int(e)) for p, s, e in shifted]


def alignment_record(plan: Plan, segments: list[tuple[str, int, int]], num_samples: int) -> dict:
    ends = np.array([e for _, _, e in segments])
    ids = np.array([PHONE_ID[p] for p, _, _ in segments])
    return {
        "utt_id": plan.utt_id,
        "sample_rate": SAMPLE_RATE,
        "num_samples": num_samples,
        "segments": [[p, s, e] for p, s, e in segments],
        "frame_labels": {
            str(rate): segment_frame_labels(ends, ids, num_samples, rate).tolist()
            for rate in LABEL_RATES
        },
    }


# --------------------------------------------------------------------------- worker


def synth_chunk(cfg: CorpusSynthConfig, indices: list[int]) -> list[dict]:
    """Synthesize and write the utterances ``indices``; runs in a fresh worker process."""
    out = Path(cfg.out)
    plans = [plan_utterance(cfg, i) for i in indices]
    requests = {p.index: Request(p.index, VOICES[p.voice], p.text, p.stretch) for p in plans}
    raws: dict[int, RawUtterance | SynthesisError] = engines.synth_festival(
        [r for r in requests.values() if r.voice.engine == "festival"])
    for index, request in requests.items():
        if request.voice.engine == "festival":
            continue
        try:
            synth = engines.synth_flite if request.voice.engine == "flite" else engines.synth_espeak
            raws[index] = synth(request)
        except (SynthesisError, engines.UnknownPhoneError) as e:
            raws[index] = SynthesisError(str(e))

    records = []
    for plan in plans:
        base = {"index": plan.index, "utt_id": plan.utt_id, "voice": plan.voice, "text": plan.text}
        raw = raws[plan.index]
        try:
            if isinstance(raw, Exception):
                raise raw
            pcm, segments = finalize(raw, plan, cfg.dither)
        except Exception as e:  # noqa: BLE001 - recorded as this utterance's failure
            records.append({**base, "ok": False, "reason": f"{type(e).__name__}: {e}"})
            continue
        audio_rel = Path("audio") / plan.voice / f"{plan.utt_id}.flac"
        align_rel = Path("align") / plan.voice / f"{plan.utt_id}.json"
        (out / audio_rel).parent.mkdir(parents=True, exist_ok=True)
        (out / align_rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out / audio_rel, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        atomic_write_text(out / align_rel, json.dumps(alignment_record(plan, segments, len(pcm))) + "\n")
        records.append({
            **base,
            "ok": True,
            "audio": audio_rel.as_posix(),
            "align": align_rel.as_posix(),
            "engine": VOICES[plan.voice].engine,
            "num_samples": len(pcm),
            "duration": len(pcm) / SAMPLE_RATE,
            "stretch": round(plan.stretch, 6),
            "num_phones": sum(1 for p, _, _ in segments if p != SILENCE),
        })
    return records


# --------------------------------------------------------------------------- driver


def _chunks(cfg: CorpusSynthConfig) -> Iterator[list[int]]:
    start = 0
    while cfg.count is None or start < cfg.count:
        stop = start + cfg.chunk_size if cfg.count is None else min(start + cfg.chunk_size, cfg.count)
        yield list(range(start, stop))
        start = stop


def _finished(cfg: CorpusSynthConfig) -> dict | None:
    """The summary of a complete corpus of this very config in ``cfg.out`` (a rerun), else None."""
    out = Path(cfg.out)
    try:
        summary = json.loads((out / "corpus.json").read_text())
    except (OSError, ValueError):
        return None
    # The overview is drawn after corpus.json: a corpus without it was interrupted.
    complete = (out / "overview.png").is_file() or not summary.get("utterances")
    return summary if complete and same_job(out, cfg) else None


def _prepare_out(cfg: CorpusSynthConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PretrainError(f"corpus output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise PretrainError(
                f"corpus output {out} is not empty; choose another 'out' or set overwrite=true")
        for name in ("audio", "align"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("utterances.jsonl", "failures.jsonl", "corpus.json", "config.yaml", "run.json",
                     "overview.png"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def synthesize_corpus(cfg: CorpusSynthConfig, progress: bool = True,
                      argv: list[str] | None = None) -> dict:
    """Build the corpus described by ``cfg``; returns the summary written to ``corpus.json``.

    ``argv`` is the command line recorded in ``run.json`` (this process's by default).
    """
    voices = [VOICES[name] for name in cfg.voices]
    engines.check_voices(voices)
    done = _finished(cfg)
    if done is not None:
        log.info("corpus %s: already synthesized with this config; nothing to do", cfg.out)
        return done
    out = _prepare_out(cfg)
    write_run_record(out, cfg, argv)
    jobs = cfg.jobs or os.cpu_count() or 1
    target = None if cfg.hours is None else cfg.hours * 3600.0
    started = time.monotonic()

    ok: list[dict] = []
    failed: list[dict] = []
    total_seconds = 0.0
    bar = tqdm(total=cfg.count if cfg.count else int(round(target)), unit="utt" if cfg.count else "audio-s",
               desc="synthesizing", disable=not progress, dynamic_ncols=True)
    # A fresh process per chunk (max_tasks_per_child=1) is what makes espeak-ng reproducible.
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        chunks = _chunks(cfg)
        pending: list[cf.Future] = []
        done = False

        def refill() -> None:
            while len(pending) < 2 * jobs:
                if target is not None:
                    # Submit only what the target still needs (by the mean duration so far),
                    # or an --hours run synthesizes up to 2 * jobs chunks it then throws away.
                    mean = total_seconds / len(ok) if ok else _PRIOR_SECONDS_PER_UTTERANCE
                    if total_seconds + len(pending) * cfg.chunk_size * mean >= target and pending:
                        return
                indices = next(chunks, None)
                if indices is None:
                    return
                pending.append(pool.submit(synth_chunk, cfg, indices))

        refill()
        while pending and not done:
            records = pending.pop(0).result()  # in index order, whatever finishes first
            for record in records:
                if done:
                    _remove_outputs(out, record)
                    continue
                if record["ok"]:
                    ok.append(record)
                    total_seconds += record["duration"]
                    # Whole audio-seconds keep the bar readable in --hours runs.
                    bar.update(1 if cfg.count else int(total_seconds) - bar.n)
                else:
                    failed.append(record)
                    log.warning("utterance %s (%s) failed: %s", record["utt_id"], record["voice"], record["reason"])
                    if cfg.count:
                        bar.update(1)
                if target is not None and total_seconds >= target:
                    done = True
            if not done:
                refill()
        for future in pending:  # chunks past the target of an --hours run
            for record in future.result():
                _remove_outputs(out, record)
    bar.close()
    elapsed = time.monotonic() - started

    summary = _write_manifests(cfg, out, ok, failed)
    if ok:
        plot_overview(out, ok, out / "overview.png")
    log.info(
        "corpus %s: %d utterances, %.2f h of audio, %d failed, %.1f s (%.0f audio-s per wall-s with %d jobs)",
        out, len(ok), total_seconds / 3600, len(failed), elapsed, total_seconds / max(elapsed, 1e-9), jobs,
    )
    return summary


def _remove_outputs(out: Path, record: dict) -> None:
    if record.get("ok"):
        (out / record["audio"]).unlink(missing_ok=True)
        (out / record["align"]).unlink(missing_ok=True)


def _write_manifests(cfg: CorpusSynthConfig, out: Path, ok: list[dict], failed: list[dict]) -> dict:
    atomic_write_text(out / "utterances.jsonl", "".join(json.dumps(r) + "\n" for r in ok))
    atomic_write_text(out / "failures.jsonl", "".join(json.dumps(r) + "\n" for r in failed))
    per_voice = Counter(r["voice"] for r in ok)
    seconds_per_voice: Counter = Counter()
    for r in ok:
        seconds_per_voice[r["voice"]] += r["duration"]
    summary = {
        "format_version": FORMAT_VERSION,
        "kind": "pretrain-synthetic-corpus",
        "sample_rate": SAMPLE_RATE,
        "label_rates": list(LABEL_RATES),
        "phones": list(PHONES),
        "seed": cfg.seed,
        "voices": {
            name: {
                "engine": VOICES[name].engine,
                "engine_voice": VOICES[name].engine_voice,
                "utterances": per_voice.get(name, 0),
                "seconds": round(seconds_per_voice.get(name, 0.0), 3),
            }
            for name in cfg.voices
        },
        "utterances": len(ok),
        "failed": len(failed),
        "seconds": round(sum(r["duration"] for r in ok), 3),
    }
    atomic_write_json(out / "corpus.json", summary)
    return summary
