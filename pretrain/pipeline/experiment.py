"""What the experiment drivers (``experiments/``: the iteration gain, the robustness protocol,
the objective comparison, the demo's gain) share: commands run and timed with their output in a
log, the data stages of a measurement through ``pretrain iterate --only``, a training through
``launch local``, and a trained run's summary. The drivers are thin: what they measure is
library code (``pretrain.probe.layer_pnmi``, ``pretrain probe``), run as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pretrain.resources import config_path
from pretrain.utils import atomic_savefig, atomic_write_json, atomic_write_text

BIN = Path(sys.executable).parent
"""Where this interpreter's ``pretrain`` and ``launch`` entry points are."""


def run(cmd: list[str], log: Path) -> float:
    """Run a command, appending its output to ``log``; seconds it took. Fails loudly."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"command failed (exit {rc}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start


def prepare_data(out: Path, hours: float, heldout_hours: float, seed: int, log: Path,
                 voices: list[str] | None = None, max_clauses: int = 3, stretch: float = 1.0) -> tuple[Path, Path]:
    """Training shards with MFCC k=100 labels (``it1_km100``), and held-out shards with phone
    alignments: other sentences (seed + 1000), every voice (so voices left out of ``voices`` are
    unseen in training), the same sentence length and speaking rate. A rerun skips what is done."""
    data = out / "data"
    cfg = data / "iterate.yaml"
    data.mkdir(parents=True, exist_ok=True)
    corpus = {"synth_hours": hours, "synth_seed": seed, "per_shard": 32, "synth_max_clauses": max_clauses,
              "synth_stretch": stretch}
    if voices is not None:
        corpus["synth_voices"] = voices
    atomic_write_text(cfg, json.dumps({
        "run_dir": str(data), "corpus": corpus,
        "iterations": [{"features": "mfcc", "k": 100, "fraction": 0.5, "max_frames": 400_000, "max_steps": 1}],
        "train_configs": [], "train_overrides": ["optim.warmup_steps=0"], "export": False, "jobs": 2}))
    for stage in ("corpus", "shards", "it1.features", "it1.kmeans", "it1.labels", "it1.quality"):
        run([str(BIN / "pretrain"), "iterate", "--config", str(cfg), f"only={stage}"], log)
    held = out / "heldout"
    if not (held / "shards" / "manifest.json").is_file():
        run([str(BIN / "pretrain"), "corpus", "synth", "--out", str(held / "corpus"), "--hours", str(heldout_hours),
             "--seed", str(seed + 1000), f"max_clauses={max_clauses}", f"stretch={stretch}", "--jobs", "2"], log)
        run([str(BIN / "pretrain"), "shards", "build", "--input", str(held / "corpus"), "--out",
             str(held / "shards"), "--per-shard", "32", "--jobs", "2"], log)
    return data / "shards", held / "shards"


def train(out: Path, name: str, config: Path, overrides: list[str], shards: Path, nproc: int, log: Path) -> Path:
    """``launch local --nproc N pretrain train`` on ``it1_km100`` into ``OUT/runs/NAME``; the wall
    time (start-up included) goes to ``train_seconds.json``. A finished run is kept; an
    interrupted one resumes, and then only the last attempt is timed."""
    run_dir = out / "runs" / name
    if (run_dir / "train_seconds.json").is_file():
        return run_dir
    cmd = [str(BIN / "launch"), "local", "--nproc", str(nproc), "pretrain", "train", "--config", str(config),
           f"run_dir={run_dir}", f"data.shards={shards}", "data.labels=[it1_km100]", *overrides]
    seconds = run(cmd, log)
    atomic_write_json(run_dir / "train_seconds.json", {"seconds": seconds, "command": cmd})
    return run_dir


def training_summary(run_dir: Path) -> dict:
    """Steps, wall time, last loss and masked accuracies, median throughput, and the minutes of
    training and masked accuracy at every logged step, from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    last = train_rows[-1] if train_rows else {}
    acc = {k: v for k, v in last.items() if k.startswith("acc_masked")}
    seconds = json.loads((run_dir / "train_seconds.json").read_text())["seconds"] \
        if (run_dir / "train_seconds.json").is_file() else None
    speeds = [r["audio_s_per_s"] for r in train_rows if r.get("audio_s_per_s")]
    speed = float(np.median(speeds)) if speeds else None
    # Minutes of training steps up to each logged step (rows hold the mean step time since the
    # previous row); the run's wall time adds start-up and checkpoint saves to this.
    minutes, prev, total = {}, 0, 0.0
    for r in train_rows:
        total += r["step_time_s"] * (r["step"] - prev)
        prev = r["step"]
        minutes[r["step"]] = total / 60
    return {"steps": last.get("step"), "train_seconds": seconds, "last_loss": last.get("loss"), **acc,
            "audio_s_per_s": speed,
            # from the median logged throughput: the metrics hold rates, not totals
            "audio_hours_seen": speed * seconds / 3600 if speed and seconds else None,
            "step_minutes": minutes,
            "acc_masked_at": {r["step"]: r.get("acc_masked") for r in train_rows}}


def finish_minutes_plot(fig, axes, ks: list[int], ylabel: str, path: Path) -> None:
    """Axes of training minutes, one panel per k; legend on the first; saved atomically."""
    for ax, k in zip(axes[0], ks):
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"k = {k}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def training_arguments(doc: str, name_help: str, out: str) -> argparse.ArgumentParser:
    """The options the gain experiments share: the training config and the corpus size."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(config_path("configs/small_cpu.yaml")), help="training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override")
    ap.add_argument("--name", default="small_cpu", help=name_help)
    ap.add_argument("--out", default=out, help="work folder (data is reused across runs)")
    ap.add_argument("--hours", type=float, default=1.5, help="training corpus hours")
    return ap
