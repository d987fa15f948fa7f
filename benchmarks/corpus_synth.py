"""Synthetic corpus throughput, side by side in one run.

1. Per engine, one process: audio seconds per CPU second of the engine alone (fresh voices,
   same sentences), the cost model behind the voice mix.
2. The whole ``pretrain corpus synth`` at several ``chunk_size`` values with the same seed and
   jobs: audio seconds per wall second, and the ratio to the default chunk size. Each chunk is
   a fresh process (espeak-ng needs it), so small chunks pay start-up more often.

Prints one JSON line per measurement and a ratio table. Usage:
    python benchmarks/corpus_synth.py [--seconds 300] [--jobs 2] [--chunks 8 16 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.config import load_config
from pretrain.config.corpus import CorpusSynthConfig
from pretrain.corpus import engines
from pretrain.corpus.engines import VOICES, Request
from pretrain.corpus.synth import synthesize_corpus
from pretrain.corpus.text import sentence


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def engine_throughput(n_sentences: int) -> list[dict]:
    rng = np.random.default_rng(0)
    texts = [sentence(rng) for _ in range(n_sentences)]
    rows = []
    for engine in ("festival", "flite", "espeak-ng"):
        voices = [v for v in VOICES.values() if v.engine == engine]
        requests = [Request(i, voices[i % len(voices)], t, 1.0) for i, t in enumerate(texts)]
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        if engine == "festival":
            raws = list(engines.synth_festival(requests).values())
        elif engine == "flite":
            raws = [engines.synth_flite(r) for r in requests]
        else:
            raws = [engines.synth_espeak(r) for r in requests]
        cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
        audio = sum(len(r.audio) / r.sample_rate for r in raws)
        rows.append({"bench": "engine", "engine": engine, "voices": len(voices),
                     "audio_s": round(audio, 1), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                     "audio_s_per_cpu_s": round(audio / cpu, 1)})
    return rows


def corpus_throughput(seconds: float, jobs: int, chunk: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CorpusSynthConfig, [], [f"out={Path(tmp) / 'c'}", f"hours={seconds / 3600}",
                                                   f"jobs={jobs}", f"chunk_size={chunk}"])
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        summary = synthesize_corpus(cfg, progress=False, argv=["benchmark"])
        cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    return {"bench": "corpus", "chunk_size": chunk, "jobs": jobs, "audio_s": summary["seconds"],
            "utterances": summary["utterances"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "audio_s_per_wall_s": round(summary["seconds"] / wall, 1),
            "audio_s_per_cpu_s": round(summary["seconds"] / cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="audio per corpus run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--sentences", type=int, default=30, help="sentences per engine")
    args = parser.parse_args()

    for row in engine_throughput(args.sentences):
        print(json.dumps(row), flush=True)
    default = CorpusSynthConfig.__dataclass_fields__["chunk_size"].default
    chunks = sorted(set(args.chunks) | {default})
    rows = []
    for chunk in chunks:
        row = corpus_throughput(args.seconds, args.jobs, chunk)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next(r for r in rows if r["chunk_size"] == default)
    print(f"\ncorpus synth, {args.jobs} jobs, ~{args.seconds:.0f} audio-s per run "
          f"(ratio = throughput / chunk_size {default}):")
    for r in rows:
        ratio = r["audio_s_per_wall_s"] / base["audio_s_per_wall_s"]
        print(f"  chunk_size {r['chunk_size']:>3}: {r['audio_s_per_wall_s']:6.1f} audio-s/wall-s, "
              f"{r['audio_s_per_cpu_s']:6.1f} audio-s/cpu-s, ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
