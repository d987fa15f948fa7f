"""Does iteration 1's model give better targets than MFCC? The HuBERT iteration gain, measured.

Runs HuBERT's first iteration with a training config (default ``configs/small_cpu.yaml``) on a
freshly synthesized, seeded corpus, then clusters MFCC and every Transformer layer of the
trained model, and scores each clustering by PNMI against the phone alignments of a *held-out*
corpus (other sentences, same voices, synthesized with another seed):

1. ``pretrain iterate --only STAGE`` for the data stages: corpus, shards, MFCC features,
   k-means (k=100), labels ``it1_km100`` (the pipeline's own stages and bookkeeping, so a rerun
   skips what is done);
2. ``launch local --nproc N pretrain train`` with the config and ``--set`` overrides into
   ``OUT/runs/NAME`` (training time is measured from the training process's start to its end);
3. held-out corpus and shards (``pretrain corpus synth``, ``pretrain shards build``);
4. k-means (FAISS, the pipeline's ``kmeans``) of MFCC and of every layer, each at k=100 and
   k=500, fitted on the same number of training frames; held-out frames assigned and scored.

Every layer is compared with MFCC on the *same* 50 Hz frames (MFCC's 100 Hz frame ``2i`` has
the centre of 50 Hz frame ``i``); MFCC's PNMI on its own 100 Hz grid is printed too, and the
verdict uses the larger of the two. The last line is JSON: ``pnmi_mfcc``, ``pnmi_best_layer``
and ``best_layer`` at k=100, everything else per k, the budget and the verdict.

    python benchmarks/iteration_gain.py                      # the recipe, ~70 min on 2 cores
    python benchmarks/iteration_gain.py --set optim.max_steps=500 --name short
    python benchmarks/iteration_gain.py --eval-only OUT/runs/NAME   # score a trained run again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.cluster.kmeans import assign, kmeans  # noqa: E402
from pretrain.cluster.quality import scores  # noqa: E402
from pretrain.data.labels import LabelSet  # noqa: E402
from pretrain.data.shards import read_manifest  # noqa: E402
from pretrain.features.extract import shard_utterances  # noqa: E402
from pretrain.features.mfcc import mfcc_39  # noqa: E402

BIN = Path(sys.executable).parent


def run(cmd: list[str], log: Path) -> float:
    """Run a command, appending its output to ``log``; seconds it took. Fails loudly."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        sys.exit(f"command failed (exit {rc}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start


def prepare_data(out: Path, hours: float, heldout_hours: float, seed: int, log: Path) -> tuple[Path, Path]:
    """Training shards with MFCC k=100 labels, and held-out shards with phone alignments."""
    data = out / "data"
    cfg = data / "iterate.yaml"
    data.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({
        "run_dir": str(data), "corpus": {"synth_hours": hours, "synth_seed": seed, "per_shard": 32},
        "iterations": [{"features": "mfcc", "k": 100, "fraction": 0.5, "max_frames": 400_000, "max_steps": 1}],
        "train_configs": [], "train_overrides": ["optim.warmup_steps=0"], "export": False, "jobs": 2}))
    for stage in ("corpus", "shards", "it1.features", "it1.kmeans", "it1.labels", "it1.quality"):
        run([str(BIN / "pretrain"), "iterate", "--config", str(cfg), f"only={stage}"], log)
    held = out / "heldout"
    if not (held / "shards" / "manifest.json").is_file():
        run([str(BIN / "pretrain"), "corpus", "synth", "--out", str(held / "corpus"), "--hours", str(heldout_hours),
             "--seed", str(seed + 1000), "--jobs", "2"], log)
        run([str(BIN / "pretrain"), "shards", "build", "--input", str(held / "corpus"), "--out",
             str(held / "shards"), "--per-shard", "32", "--jobs", "2"], log)
    return data / "shards", held / "shards"


def train(out: Path, name: str, config: Path, overrides: list[str], shards: Path, nproc: int, log: Path) -> Path:
    run_dir = out / "runs" / name
    if (run_dir / "train_seconds.json").is_file():
        return run_dir
    cmd = [str(BIN / "launch"), "local", "--nproc", str(nproc), "pretrain", "train", "--config", str(config),
           f"run_dir={run_dir}", f"data.shards={shards}", "data.labels=[it1_km100]", *overrides]
    seconds = run(cmd, log)
    (run_dir / "train_seconds.json").write_text(json.dumps({"seconds": seconds, "command": cmd}) + "\n")
    return run_dir


def utterances(shards: Path, limit_frames: int | None = None, seed: int = 0):
    """(shard, key, waveform), shards in a seeded order, until ``limit_frames`` 50 Hz frames."""
    names = [s["name"] for s in read_manifest(shards)["shards"]]
    if limit_frames is not None:
        names = list(np.random.default_rng(seed).permutation(names))
    frames = 0
    for name in names:
        for key, wave in shard_utterances(shards / name):
            yield name, key, wave
            frames += len(wave) // 320
            if limit_frames is not None and frames >= limit_frames:
                return


def phone_labels(shards: Path, rate: int) -> dict[tuple[str, str], np.ndarray]:
    labels = LabelSet(shards, f"phones{rate}")
    return {(name, key): y for name in (s["name"] for s in read_manifest(shards)["shards"])
            for key, y in labels.load_shard(name).items()}


def pnmi(clusters: list[np.ndarray], phones: list[np.ndarray], k: int, num_phones: int) -> float:
    counts = np.zeros((num_phones, k), dtype=np.int64)
    for z, y in zip(clusters, phones):
        n = min(len(z), len(y))
        np.add.at(counts, (y[:n], z[:n]), 1)
    return scores(counts)["pnmi"]


def layer_states(model, waves: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Per utterance, every layer's (frames, dim) hidden states (one utterance per forward, so
    no front end sees padding)."""
    import torch

    out = []
    for w in waves:
        audio = torch.from_numpy(w)[None]
        states, _ = model.backbone.all_hidden_states(audio, torch.tensor([len(w)]))
        out.append([s[0].float().numpy() for s in states])
    return out


def evaluate(checkpoint: Path, shards: Path, heldout: Path, ks: list[int], sample_frames: int, seed: int) -> dict:
    import torch

    from pretrain.model.checkpoint import load_model

    torch.set_num_threads(2)
    model = load_model(checkpoint).eval()
    layers = model.cfg.encoder_layers

    train_utts = list(utterances(shards, sample_frames, seed))
    held_utts = list(utterances(heldout))
    p50, p100 = phone_labels(heldout, 50), phone_labels(heldout, 100)
    num_phones = LabelSet(heldout, "phones50").num_classes
    y50 = [p50[(s, k)] for s, k, _ in held_utts]
    y100 = [p100[(s, k)] for s, k, _ in held_utts]

    # MFCC: fitted on the same utterances' frames (twice as many, at 100 Hz) as the layers.
    mfcc_train = np.concatenate([mfcc_39(w) for _, _, w in train_utts])
    mfcc_held = [mfcc_39(w) for _, _, w in held_utts]
    table: dict = {"mfcc_50hz": {}, "mfcc_100hz": {}, **{f"layer{i}": {} for i in range(1, layers + 1)}}
    for k in ks:
        centroids, _ = kmeans(mfcc_train, k, seed=seed)
        z = [assign(x, centroids)[0] for x in mfcc_held]
        table["mfcc_100hz"][k] = pnmi(z, y100, k, num_phones)
        table["mfcc_50hz"][k] = pnmi([zz[::2] for zz in z], y50, k, num_phones)

    train_states = layer_states(model, [w for _, _, w in train_utts])
    held_states = layer_states(model, [w for _, _, w in held_utts])
    for layer in range(1, layers + 1):
        x = np.concatenate([u[layer - 1] for u in train_states])
        for k in ks:
            centroids, _ = kmeans(x, k, seed=seed)
            z = [assign(u[layer - 1], centroids)[0] for u in held_states]
            table[f"layer{layer}"][k] = pnmi(z, y50, k, num_phones)
    return {"table": table, "layers": layers, "train_frames_50hz": int(sum(len(w) // 320 for _, _, w in train_utts)),
            "heldout_frames_50hz": int(sum(len(y) for y in y50)), "checkpoint": str(checkpoint)}


def training_summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    last = train_rows[-1] if train_rows else {}
    acc = {k: v for k, v in last.items() if k.startswith("acc_masked")}
    seconds = json.loads((run_dir / "train_seconds.json").read_text())["seconds"] \
        if (run_dir / "train_seconds.json").is_file() else None
    speeds = [r["audio_s_per_s"] for r in train_rows if r.get("audio_s_per_s")]
    speed = float(np.median(speeds)) if speeds else None
    return {"steps": last.get("step"), "train_seconds": seconds, "last_loss": last.get("loss"), **acc,
            "audio_s_per_s": speed,
            # from the median logged throughput: the metrics hold rates, not totals
            "audio_hours_seen": speed * seconds / 3600 if speed and seconds else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "small_cpu.yaml"), help="training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override")
    ap.add_argument("--name", default="small_cpu", help="run name under OUT/runs")
    ap.add_argument("--out", default="/tmp/iteration_gain", help="work folder (data is reused across runs)")
    ap.add_argument("--hours", type=float, default=1.5, help="training corpus hours")
    ap.add_argument("--heldout-hours", type=float, default=0.3, help="held-out corpus hours")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed (held-out: seed + 1000)")
    ap.add_argument("--nproc", type=int, default=2, help="training processes")
    ap.add_argument("--ks", default="100,500", help="cluster counts")
    ap.add_argument("--sample-frames", type=int, default=150_000,
                    help="50 Hz training frames the k-means of each layer (and MFCC) is fitted on")
    ap.add_argument("--eval-only", metavar="RUN_DIR", help="score this trained run; no training")
    ap.add_argument("--checkpoint", help="score this model file or checkpoint folder instead of the run's latest")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    ks = [int(k) for k in args.ks.split(",")]

    t0 = time.perf_counter()
    shards, heldout = prepare_data(out, args.hours, args.heldout_hours, args.seed, log)
    t_data = time.perf_counter() - t0
    if args.eval_only:
        run_dir = Path(args.eval_only).resolve()
    else:
        run_dir = train(out, args.name, Path(args.config).resolve(), args.set, shards, args.nproc, log)
    t1 = time.perf_counter()
    checkpoint = Path(args.checkpoint) if args.checkpoint else \
        run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    result = evaluate(checkpoint, shards, heldout, ks, args.sample_frames, args.seed)
    t_eval = time.perf_counter() - t1
    summary = training_summary(run_dir)

    table, layers = result["table"], result["layers"]
    print(f"\nrun {run_dir}  ({summary['steps']} steps, "
          f"{(summary['train_seconds'] or 0) / 60:.1f} min training, {summary})")
    print(f"held-out PNMI ({result['heldout_frames_50hz']} frames at 50 Hz; k-means on "
          f"{result['train_frames_50hz']} training frames at 50 Hz)")
    print("features       " + "".join(f"  k={k:<6}" for k in ks))
    for row in ["mfcc_100hz", "mfcc_50hz", *[f"layer{i}" for i in range(1, layers + 1)]]:
        print(f"{row:<14} " + "".join(f"  {table[row][k]:.3f}  " for k in ks))
    per_k = {}
    for k in ks:
        mfcc = max(table["mfcc_50hz"][k], table["mfcc_100hz"][k])
        best = max(range(1, layers + 1), key=lambda i: table[f"layer{i}"][k])
        per_k[k] = {"pnmi_mfcc": mfcc, "pnmi_best_layer": table[f"layer{best}"][k], "best_layer": best,
                    "gain": table[f"layer{best}"][k] - mfcc}
    k0 = ks[0]
    record = {"pnmi_mfcc": per_k[k0]["pnmi_mfcc"], "pnmi_best_layer": per_k[k0]["pnmi_best_layer"],
              "best_layer": per_k[k0]["best_layer"], "k": k0,
              "beats_mfcc": {str(k): v["gain"] > 0 for k, v in per_k.items()}, "per_k": per_k, "table": table,
              "train_minutes": (summary["train_seconds"] or 0) / 60, "steps": summary["steps"], "training": summary,
              "config": args.config, "overrides": args.set, "corpus_hours": args.hours,
              "heldout_hours": args.heldout_hours, "seed": args.seed, "data_seconds": t_data,
              "eval_seconds": t_eval, "run_dir": str(run_dir)}
    record["checkpoint"] = str(checkpoint)
    if not args.checkpoint:
        (run_dir / "iteration_gain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
