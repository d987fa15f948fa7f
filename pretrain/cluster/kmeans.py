"""``pretrain kmeans fit``: FAISS k-means on a feature sample, GPU when FAISS sees one.

Output folder::

    centroids.npy   (k, dim) float32
    kmeans.json     provenance: the feature spec (kind, checkpoint sha256, layer, rate, dim),
                    the sample (folder, sha256, frames, fraction, max_frames, seed), k, niter,
                    nredo, init, seed, device, FAISS version, objective per iteration and the
                    final inertia per point, time
    objective.png   inertia per point over the Lloyd iterations

Coarse to fine: on a seeded subsample of ``coarse_points`` points, FAISS's k-means++ seeds the
centroids (from ``init_points_per_centroid * k`` of them) and ``coarse_niter`` Lloyd iterations
fit them; then ``niter`` Lloyd iterations on every point refine them. ``benchmarks/kmeans.py``
compares this with scikit-learn's MiniBatchKMeans with fairseq's settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from pretrain.config.cluster import KmeansFitConfig
from pretrain.features.sample import load_sample
from pretrain.utils import PretrainError, atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def kmeans(x: np.ndarray, k: int, niter: int = 5, nredo: int = 1, init: str = "kmeans++",
           init_points_per_centroid: int = 40, max_points_per_centroid: int | None = None,
           seed: int = 0, gpu: bool = False, coarse_points: int | None = 50_000,
           coarse_niter: int = 20) -> tuple[np.ndarray, list[float]]:
    """Centroids (k, dim) and the objective (sum of squared distances) per Lloyd iteration on
    every point.

    Coarse to fine: when the sample has more than ``coarse_points`` points, the centroids are
    first fitted (seeding and ``coarse_niter`` Lloyd iterations) on a seeded subsample of that
    size, then refined by ``niter`` iterations on every point. On 200k points this reached a
    lower inertia than 20 iterations on every point in half the time (benchmarks/kmeans.py).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    if n == 0:
        raise PretrainError("the feature sample is empty: no frames to cluster")
    if k > n:
        raise PretrainError(f"k={k} is larger than the sample ({n} frames); sample more frames or lower k")
    if not np.isfinite(x).all():
        raise PretrainError("the feature sample holds non-finite values")
    if init == "kmeans++" and not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        raise PretrainError(f"init=kmeans++ needs faiss >= 1.15 (this is {faiss.__version__}); "
                            "upgrade it or set init=random")

    def subsample(m: int, run_seed: int) -> np.ndarray:
        return x[np.sort(np.random.default_rng(run_seed).choice(n, m, replace=False))] if m < n else x

    def lloyd(points: np.ndarray, iters: int, run_seed: int, start: np.ndarray | None) -> faiss.Kmeans:
        if start is None and init == "kmeans++":
            m = min(len(points), init_points_per_centroid * k)
            seeder = faiss.Kmeans(dim, k, niter=0, seed=run_seed, max_points_per_centroid=m // k + 1,
                                  init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS, verbose=False,
                                  gpu=bool(gpu))
            seeder.train(np.ascontiguousarray(points[np.sort(np.random.default_rng(run_seed + 7919).choice(
                len(points), m, replace=False))]) if m < len(points) else points)
            start = seeder.centroids.copy()
        # FAISS subsamples beyond max_points_per_centroid; by default it uses every point.
        mppc = max_points_per_centroid or (len(points) // k + 1)
        km = faiss.Kmeans(dim, k, niter=iters, seed=run_seed, max_points_per_centroid=mppc, gpu=bool(gpu),
                          verbose=False)
        km.train(points, init_centroids=start)
        return km

    best: tuple[float, np.ndarray, list[float]] | None = None
    for redo in range(nredo):
        run_seed = seed + redo
        start = None
        if coarse_points is not None and coarse_niter > 0 and k < coarse_points < n:
            start = lloyd(subsample(coarse_points, run_seed), coarse_niter, run_seed, None).centroids.copy()
        km = lloyd(x, niter, run_seed, start)
        objective = [float(v) for v in km.obj]
        if not objective:  # niter 0 or FAISS kept no stats: measure it
            objective = [assignment_inertia(x, km.centroids)]
        if best is None or objective[-1] < best[0]:
            best = (objective[-1], km.centroids.copy(), objective)
    assert best is not None
    return best[1], best[2]


def assign(x: np.ndarray, centroids: np.ndarray, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row (int64) and its squared distance."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise PretrainError(f"features have dimension {x.shape[-1]}, the centroids {centroids.shape[1]}")
    index = faiss.IndexFlatL2(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, labels = index.search(x, 1)
    return labels[:, 0], dist[:, 0]


def assignment_inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    return float(assign(x, centroids)[1].astype(np.float64).sum())


def fit(cfg: KmeansFitConfig) -> dict:
    import faiss

    gpus = faiss_gpus()
    if cfg.device == "gpu" and gpus == 0:
        raise PretrainError("device=gpu, but this FAISS build sees no GPU (install faiss-gpu on a GPU machine)")
    x, meta = load_sample(cfg.features)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus > 0)
    log.info("k-means: %d frames x %d dims, k=%d, %s", len(x), x.shape[1], cfg.k, "GPU" if use_gpu else "CPU")
    t0 = time.perf_counter()
    centroids, objective = kmeans(x, cfg.k, cfg.niter, cfg.nredo, cfg.init, cfg.init_points_per_centroid,
                                  cfg.max_points_per_centroid, cfg.seed, use_gpu, cfg.coarse_points,
                                  cfg.coarse_niter)
    seconds = time.perf_counter() - t0
    inertia = assignment_inertia(x, centroids)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, centroids.astype(np.float32))
    atomic_write_bytes(out / "centroids.npy", buf.getvalue())

    record = {
        "format_version": 1,
        "spec": meta["spec"],
        "sample": {"features": str(Path(cfg.features).resolve()), "sample_sha256": meta["sample_sha256"],
                   "frames": int(len(x)), "utterances": meta["total_utterances"], "fraction": meta["fraction"],
                   "max_frames": meta["max_frames"], "seed": meta["seed"], "shards_dir": meta["shards_dir"]},
        "k": cfg.k, "niter": cfg.niter, "nredo": cfg.nredo, "init": cfg.init,
        "init_points_per_centroid": cfg.init_points_per_centroid, "coarse_points": cfg.coarse_points,
        "coarse_niter": cfg.coarse_niter,
        "max_points_per_centroid": cfg.max_points_per_centroid, "seed": cfg.seed,
        "device": "gpu" if use_gpu else "cpu", "faiss_version": faiss.__version__,
        "objective": objective, "inertia_per_point": inertia / len(x), "seconds": round(seconds, 3),
        "centroids_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
    }
    _plot_objective(objective, len(x), out / "objective.png", cfg.k)
    # Last: its presence (with the centroids' sha256) is what marks the fit complete.
    atomic_write_json(out / "kmeans.json", record)
    return record


def _plot_objective(objective: list[float], n: int, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(objective) + 1), [v / n for v in objective], marker=".")
    ax.set_xlabel("Lloyd iteration")
    ax.set_ylabel("inertia per point")
    ax.set_title(f"k-means, k={k}, {n} points")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def load_kmeans(folder: str | Path, checkpoint: str | None = None) -> tuple[np.ndarray, dict]:
    """Centroids and record of a ``kmeans fit`` folder, checked against each other.

    ``checkpoint``: where the model of a model-feature k-means lives now, when it moved (a run
    directory moved or copied); its sha256 must be the recorded one, and the returned record's
    spec points at it."""
    folder = Path(folder)
    path = folder / "kmeans.json"
    if not path.is_file():
        raise PretrainError(f"{folder} has no kmeans.json: not a folder written by pretrain kmeans fit")
    record = json.loads(path.read_text())
    if sha256_file(folder / "centroids.npy") != record["centroids_sha256"]:
        raise PretrainError(f"{folder}/centroids.npy does not match the sha256 in its kmeans.json (an "
                            "interrupted or concurrent fit?); fit again")
    if checkpoint is not None and record["spec"]["kind"] == "model":
        # Here, not at the top: assigning MFCC labels never loads torch (2 s per worker).
        from pretrain.model.checkpoint import resolve_model_file

        file = resolve_model_file(checkpoint)
        if sha256_file(file) != record["spec"]["checkpoint_sha256"]:
            raise PretrainError(f"checkpoint={checkpoint}: {file} is not the model k-means {folder} was fitted "
                                f"on (sha256 differs from {record['spec']['checkpoint']}'s)")
        record["spec"] = {**record["spec"], "checkpoint": str(file.resolve())}
    centroids = np.load(folder / "centroids.npy")
    if centroids.shape != (record["k"], record["spec"]["dim"]):
        raise PretrainError(f"{folder}/centroids.npy has shape {centroids.shape}, kmeans.json says "
                            f"({record['k']}, {record['spec']['dim']})")
    return centroids, record
