"""The GPU check: everything a GPU can tell us, in one run of at most about 8 minutes on one
GPU. Each result is one JSON line on stdout (and in ``OUT/gpu_check.jsonl``):

0. ``device``: the GPU, torch, the CPU cores and the FLAC decoder the data workers use.
1. ``gpu_tests``: the ``gpu``-marked tests (bf16 autocast, fp16/bf16 ZeRO 2 training, faiss-gpu
   k-means, probes on the GPU).
2. ``train``: HuBERT BASE (95M) in bf16 with ZeRO 2 on the recipe's crops (``max_sample_size``
   250k samples, ``max_tokens`` 1.4M per GPU), with and without ``model.compile``: audio-seconds
   per second counting the audio (non-padded) and what the model computed on (padded,
   "nominal"), step time, data wait and peak GPU memory, from the run's own ``metrics.jsonl``
   with the first logging window (start-up, compilation) left out.
3. ``kmeans``: k-means (k=500) on 1M x 768 random-cluster points, faiss-gpu against faiss-cpu,
   same code path as ``pretrain kmeans fit``.
4. ``features``: ``pretrain features model`` throughput (audio-seconds per second) of the BASE
   model trained in 2, on the GPU.

The audio is synthetic (tones in noise, LibriSpeech-like 2-16.5 s lengths) with random labels:
throughput does not depend on what is said, and the check must run on a machine with no TTS
engines. Usage: ``bash benchmarks/gpu_check.sh`` (see it for the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def emit(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with (out / "gpu_check.jsonl").open("a") as fh:
        fh.write(line + "\n")


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    with log.open("w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})


def gpu_tests(out: Path, timeout: float) -> None:
    log = out / "gpu_tests.log"
    start = time.monotonic()
    try:
        proc = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], log, timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    text = log.read_text()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    emit(out, {"check": "gpu_tests", "exit": code, **counts, "seconds": round(time.monotonic() - start, 1)})


def make_corpus(root: Path, seconds: float, seed: int = 0) -> Path:
    """Synthetic speech-like audio in real shards (``pretrain shards build``) plus a random
    500-class 50 Hz label set, as clustering would write it."""
    import soundfile as sf

    from pretrain.data.labels import write_label_meta, write_label_shard
    from pretrain.data.shards import shard_index
    from pretrain.frames import conv_num_frames

    rng = np.random.default_rng(seed)
    audio_dir, shards = root / "audio", root / "shards"
    audio_dir.mkdir(parents=True, exist_ok=True)
    total, i = 0.0, 0
    while total < seconds:
        dur = float(rng.uniform(2.0, 16.5))
        t = np.arange(int(dur * 16000)) / 16000
        f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        wave = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.05 * rng.standard_normal(len(t))
        sf.write(audio_dir / f"utt{i:05d}.flac", wave.astype(np.float32), 16000, subtype="PCM_16")
        total, i = total + dur, i + 1
    subprocess.run([sys.executable, "-m", "pretrain.cli", "shards", "build", "per_shard=64",
                    f"jobs={min(8, os.cpu_count() or 1)}", "--input", str(audio_dir), "--out", str(shards),
                    "--no-progress"], check=True, cwd=REPO, capture_output=True)
    by_shard: dict[str, dict[str, np.ndarray]] = {}
    for key, (shard, samples, _) in shard_index(shards, progress=False).items():
        by_shard.setdefault(shard, {})[key] = rng.integers(0, 500, conv_num_frames(samples))
    entries = {shard: write_label_shard(shards, "random500", shard, labels) for shard, labels in by_shard.items()}
    write_label_meta(shards, "random500", 50, 500, entries, {"source": "benchmarks/gpu_check.py: random"})
    return shards


# --smoke: the same code paths at CPU size (a check of this script, not a measurement).
SMOKE = ["--config", str(REPO / "configs/model/tiny.yaml"), "deepspeed.precision=fp32", "deepspeed.zero_stage=1",
         "data.max_sample_size=32000", "data.min_sample_size=8000", "data.max_tokens=96000", "data.num_workers=1"]


def train(out: Path, shards: Path, compile_: bool, steps: int, timeout: float, smoke: bool) -> Path:
    name = "compiled" if compile_ else "eager"
    run_dir = out / f"train_{name}"
    model = SMOKE[:2] if smoke else ["--config", str(REPO / "configs/model/base.yaml")]
    # Overrides come before the flags.
    cmd = [sys.executable, "-m", "launch.cli", "local", "--nproc", "1", "pretrain", "train",
           f"data.shards={shards}", "data.labels=[random500]", "data.num_workers=6", "deepspeed.precision=bf16",
           "deepspeed.zero_stage=2", f"optim.max_steps={steps}", "optim.warmup_steps=10", "log.every=5",
           f"checkpoint.every={steps}", "log.wandb=disabled", "log.tensorboard=false",
           f"model.compile={str(compile_).lower()}", *(SMOKE[2:] if smoke else []), *model, "--run-dir", str(run_dir)]
    start = time.monotonic()
    try:
        code = run(cmd, out / f"train_{name}.log", timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    record = {"check": "train", "model": "tiny (smoke)" if smoke else "base", "precision": "fp32" if smoke else "bf16",
              "zero_stage": 1 if smoke else 2, "compile": compile_,
              "exit": code, "wall_s": round(time.monotonic() - start, 1)}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    timed = [r for r in rows if "audio_s_per_s" in r][1:]  # the first window holds start-up and compilation
    if timed:
        secs = sum(r["step_time_s"] for r in timed)
        record.update({
            "steps_timed": 5 * len(timed),
            "audio_s_per_s": round(sum(r["audio_s_per_s"] * r["step_time_s"] for r in timed) / secs, 1),
            "padded_audio_s_per_s": round(sum(r["padded_audio_s_per_s"] * r["step_time_s"] for r in timed) / secs, 1),
            "step_time_s": round(secs / len(timed), 4),
            "data_wait_s": round(sum(r["data_wait_s"] for r in timed) / len(timed), 4),
            "peak_gpu_mb": round(max(r.get("peak_gpu_mb", 0.0) for r in timed)),
            "goal_audio_s_per_s": 4000})
    emit(out, record)
    return run_dir


def kmeans_check(out: Path, points: int, dim: int, k: int) -> None:
    from pretrain.cluster.kmeans import faiss_gpus, kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((k, dim)).astype(np.float32) * 3
    x = centres[rng.integers(0, k, points)] + rng.standard_normal((points, dim)).astype(np.float32)
    record = {"check": "kmeans", "points": points, "dim": dim, "k": k, "faiss_gpus": faiss_gpus()}
    for device in (["gpu"] if record["faiss_gpus"] else []) + ["cpu"]:
        start = time.monotonic()
        _, objective = kmeans(x, k, niter=5, gpu=device == "gpu")
        record[f"{device}_s"] = round(time.monotonic() - start, 2)
        record[f"{device}_inertia_per_point"] = round(objective[-1] / points, 3)
    if "gpu_s" in record:
        record["gpu_speedup"] = round(record["cpu_s"] / record["gpu_s"], 1)
    else:
        record["gpu"] = "faiss has no GPU support here (install faiss-gpu)"
    emit(out, record)


def features_check(out: Path, shards: Path, checkpoint: Path, timeout: float, layer: int) -> None:
    feats = out / "features"
    start = time.monotonic()
    try:
        code = run([sys.executable, "-m", "pretrain.cli", "features", "model", "fraction=1.0", "max_frames=100000000",
                    "jobs=1", "--layer", str(layer), "--checkpoint", str(checkpoint), "--shards", str(shards),
                    "--out", str(feats), "--no-progress"],
                   out / "features.log", timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.monotonic() - start
    from pretrain.data.shards import read_manifest

    audio = read_manifest(shards)["totals"]["seconds"]
    emit(out, {"check": "features", "layer": layer, "exit": code, "audio_s": round(audio),
               "wall_s": round(seconds, 1), "audio_s_per_s": round(audio / seconds, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--audio-seconds", type=float, default=1800.0, help="synthetic corpus size")
    parser.add_argument("--steps", type=int, default=60, help="training steps per configuration")
    parser.add_argument("--kmeans-points", type=int, default=1_000_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "train", "kmeans", "features"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, fp32, small crops, little data: check this script on a CPU")
    args = parser.parse_args()
    if args.smoke:
        args.audio_seconds, args.steps, args.kmeans_points = min(args.audio_seconds, 120.0), min(args.steps, 15), 20_000
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from pretrain.data import flac

    # The FLAC decoder bounds what the data workers deliver (soundfile's is 1.6x slower), so the
    # throughput lines below are read with it.
    emit(args.out, {"check": "device", "cuda": torch.cuda.is_available(),
                    "name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "cpu_cores": os.cpu_count(), "flac_decoder": flac.describe()})
    if "tests" not in args.skip:
        gpu_tests(args.out, timeout=150)
    shards = None
    if {"train", "features"} - set(args.skip):
        start = time.monotonic()
        shards = make_corpus(args.out / "corpus", args.audio_seconds)
        emit(args.out, {"check": "corpus", "audio_s": args.audio_seconds, "seconds": round(time.monotonic() - start, 1)})
    eager = None
    if "train" not in args.skip:
        eager = train(args.out, shards, False, args.steps, timeout=120, smoke=args.smoke)
        train(args.out, shards, True, args.steps, timeout=180, smoke=args.smoke)
    if "kmeans" not in args.skip:
        kmeans_check(args.out, args.kmeans_points, 768, 500)
    if "features" not in args.skip and eager is not None:
        checkpoint = eager / "checkpoints" / f"step_{args.steps}"
        if checkpoint.is_dir():
            features_check(args.out, shards, checkpoint, timeout=90, layer=2 if args.smoke else 6)


if __name__ == "__main__":
    main()
