"""FAISS k-means (``pretrain kmeans fit``'s settings) vs scikit-learn MiniBatchKMeans with
fairseq's HuBERT settings, on the same points, in one run.

Configurations:

- 39-dim / k=100: real MFCC frames (``pretrain.features.mfcc``) of a shard directory
  (``--shards``; the demo's by default), up to ``--points``;
- 768-dim / k=500: 20 consecutive MFCC frames of the same shards stacked (cut to 768 dims),
  because no trained BASE model is at hand on a CPU machine; this measures the algorithms'
  speed and inertia on speech-like data, not label quality.

Inertia per point is measured the same way for both (squared distance to the nearest centroid,
over every point). Prints a table and ratios, then one JSON line with ``speedup`` and
``inertia_ratio`` (worst case over the configurations) and ``assign_frames_per_s``.

    python benchmarks/kmeans.py [--shards runs/demo/shards] [--points 200000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.cluster.kmeans import assign, kmeans
from pretrain.data.shards import read_manifest
from pretrain.features.extract import shard_utterances
from pretrain.features.mfcc import mfcc_39


def mfcc_points(shards: Path, limit: int) -> np.ndarray:
    parts, total = [], 0
    for entry in read_manifest(shards)["shards"]:
        for _, wave in shard_utterances(shards / entry["name"]):
            parts.append(mfcc_39(wave))
            total += len(parts[-1])
        if total >= limit:
            break
    x = np.concatenate(parts)
    return x[np.sort(np.random.default_rng(0).choice(len(x), min(limit, len(x)), replace=False))]


def stacked_mfcc_points(shards: Path, limit: int, context: int = 20, dim: int = 768) -> np.ndarray:
    """768-dim speech-derived points: 20 consecutive MFCC frames stacked (780 dims, cut to
    768). A stand-in for a BASE model's layer (none trained on a CPU machine) that keeps the
    continuous structure of speech features, unlike a synthetic mixture of blobs."""
    parts, total = [], 0
    for entry in read_manifest(shards)["shards"]:
        for _, wave in shard_utterances(shards / entry["name"]):
            m = mfcc_39(wave)
            if len(m) <= context:
                continue
            idx = np.arange(len(m) - context)[:, None] + np.arange(context)[None, :]
            parts.append(m[idx].reshape(len(idx), -1)[:, :dim])
            total += len(idx)
        if total >= limit:
            break
    x = np.concatenate(parts)
    return np.ascontiguousarray(x[np.sort(np.random.default_rng(1).choice(len(x), min(limit, len(x)),
                                                                          replace=False))])


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    return float(assign(x, centroids)[1].astype(np.float64).mean())


def sklearn_fit(x: np.ndarray, k: int, n_init: int) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, init="k-means++", max_iter=100, batch_size=10000, compute_labels=False,
                         tol=0.0, max_no_improvement=100, init_size=None, n_init=n_init,
                         reassignment_ratio=0.0, random_state=0)
    km.fit(x)
    return km.cluster_centers_.astype(np.float32)


def timed_fit(method: str, points: Path, k: int, n_init: int, out: Path) -> float:
    """One fit in a fresh process, timed there after loading the points: FAISS and
    scikit-learn bring their own OpenMP runtimes, and one library's idle threads slowed the
    other when both ran in one process (a 39-dim FAISS fit took 0.6 s alone, 1.2 s after a
    scikit-learn fit)."""
    cmd = [sys.executable, __file__, "--worker", method, str(points), str(k), str(n_init), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def worker(method: str, points: str, k: int, n_init: int, out: str) -> None:
    x = np.load(points)
    warm = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32)
    if method == "sklearn":  # warm up (OpenMP threads, BLAS) before timing
        sklearn_fit(warm, 10, 1)
    else:
        kmeans(warm, 10, niter=2)
    t0 = time.perf_counter()
    if method == "ours":
        centroids, _ = kmeans(x, k)  # the KmeansFitConfig defaults
    elif method == "random":
        centroids, _ = kmeans(x, k, init="random")
    else:
        centroids = sklearn_fit(x, k, n_init)
    seconds = time.perf_counter() - t0
    np.save(out, centroids)
    print(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, default=Path("runs/demo/shards"))
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="20k points and sklearn n_init 3 (a smoke run)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, points, k, n_init, out = args.worker
        worker(method, points, int(k), int(n_init), out)
        return
    n = 20_000 if args.quick else args.points
    n_init = 3 if args.quick else 20

    rows, speedups, ratios, assign_rates = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, k in [("mfcc-39", mfcc_points, 100), ("stack-768", stacked_mfcc_points, 500)]:
            x = make(args.shards, n)
            points = Path(tmp) / f"{name}.npy"
            np.save(points, x)
            times, inertias = {}, {}
            for method in ("ours", "random", "sklearn"):
                out = Path(tmp) / f"{name}-{method}.npy"
                times[method] = timed_fit(method, points, k, n_init, out)
                inertias[method] = inertia(x, np.load(out))
            t0 = time.perf_counter()
            assign(x, np.load(Path(tmp) / f"{name}-ours.npy"))
            rate = len(x) / (time.perf_counter() - t0)
            t_ours, t_random, t_ref = times["ours"], times["random"], times["sklearn"]
            i_ours, i_random, i_ref = inertias["ours"], inertias["random"], inertias["sklearn"]
            rows.append((name, len(x), k, t_ours, i_ours, t_random, i_random, t_ref, i_ref, rate))
            speedups.append(t_ref / t_ours)
            ratios.append(i_ours / i_ref)
            assign_rates.append(rate)
            print(f"{name:9s} n={len(x)} k={k}: ours (coarse fit on 50k points, then Lloyd 5 on "
                  f"all) {t_ours:.2f} s, inertia {i_ours:.5g} | FAISS random init {t_random:.2f} s, {i_random:.5g} | "
                  f"sklearn MiniBatchKMeans n_init={n_init} {t_ref:.2f} s, {i_ref:.5g} | speedup "
                  f"{t_ref / t_ours:.1f}x, inertia ratio {i_ours / i_ref:.4f} (random init {i_random / i_ref:.4f}); "
                  f"assign {rate:,.0f} frames/s", flush=True)
    print(json.dumps({"bench": "kmeans", "points": n, "sklearn_n_init": n_init,
                      "speedup": round(min(speedups), 2), "inertia_ratio": round(max(ratios), 5),
                      "assign_frames_per_s": round(min(assign_rates)),
                      "configs": [{"name": r[0], "points": r[1], "k": r[2], "faiss_s": round(r[3], 3),
                                   "faiss_inertia": r[4], "faiss_random_init_s": round(r[5], 3),
                                   "faiss_random_init_inertia": r[6], "sklearn_s": round(r[7], 3),
                                   "sklearn_inertia": r[8], "assign_frames_per_s": round(r[9])} for r in rows]}))


if __name__ == "__main__":
    main()
