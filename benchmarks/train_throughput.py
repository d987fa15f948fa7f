"""Training throughput of the tiny model on CPU: 1 process vs 2 processes, in one run.

Each configuration trains ``--steps`` optimizer steps with ``launch local`` (real DeepSpeed,
gloo) on the same shards; the audio-seconds per second are read from ``metrics.jsonl``,
leaving out the first logging window (start-up, first batches). Ends with one JSON line holding
``audio_s_per_s_1proc`` and ``audio_s_per_s_2proc``.

Usage: python benchmarks/train_throughput.py [--shards DIR] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pretrain.config import load_config
from pretrain.config.corpus import CorpusSynthConfig
from pretrain.config.shards import ShardsBuildConfig
from pretrain.corpus.synth import synthesize_corpus
from pretrain.data.shards import build_shards

REPO = Path(__file__).resolve().parents[1]


def run(nproc: int, shards: Path, run_dir: Path, steps: int, log_every: int) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    cmd = [str(Path(sys.executable).parent / "launch"), "local", "--nproc", str(nproc), "pretrain", "train",
           "--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
           "--run-dir", str(run_dir), f"data.shards={shards}", f"optim.max_steps={steps}",
           f"log.every={log_every}", f"checkpoint.every={steps}", "log.wandb=disabled"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "audio_s_per_s" in r][1:]  # the first window includes start-up
    audio = sum(r["audio_s_per_s"] * r["step_time_s"] * log_every for r in timed)
    seconds = sum(r["step_time_s"] * log_every for r in timed)
    return audio / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shards with the phones100 label set (default: make some)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            corpus, shards = Path(tmp) / "corpus", Path(tmp) / "shards"
            synthesize_corpus(load_config(CorpusSynthConfig, [], [f"out={corpus}", "count=64"]),
                              progress=False, argv=["benchmark"])
            build_shards(load_config(ShardsBuildConfig, [], [f"input={corpus}", f"out={shards}", "per_shard=8"]),
                         progress=False, argv=["benchmark"])
        results = {}
        for nproc in (1, 2):
            results[nproc] = run(nproc, shards, Path(tmp) / f"run{nproc}", args.steps, args.log_every)
            print(json.dumps({"bench": "train_throughput", "nproc": nproc, "model": "tiny", "device": "cpu",
                              "audio_s_per_s": round(results[nproc], 2)}), flush=True)
    print(f"\ntiny model, CPU: 1 process {results[1]:.1f} audio-s/s, 2 processes {results[2]:.1f} "
          f"audio-s/s, ratio {results[2] / results[1]:.2f}")
    print(json.dumps({"bench": "train_throughput", "audio_s_per_s_1proc": round(results[1], 2),
                      "audio_s_per_s_2proc": round(results[2], 2),
                      "ratio_2proc_vs_1proc": round(results[2] / results[1], 3)}))


if __name__ == "__main__":
    main()
