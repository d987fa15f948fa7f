"""FAISS k-means: reproducible, exact assignment, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.cluster.kmeans import assign, fit, kmeans, load_kmeans
from pretrain.config import load_config
from pretrain.config.cluster import FeaturesMfccConfig, KmeansFitConfig
from pretrain.features.extract import FeatureSpec
from pretrain.features.sample import dump_features
from pretrain.utils import PretrainError


def blobs(n=3000, dim=8, k=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)) * 6
    return (centers[rng.integers(0, k, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def test_kmeans_is_reproducible_with_a_fixed_seed_and_seeds_matter():
    x = blobs()
    a, obj_a = kmeans(x, 12, niter=10, seed=3)
    b, obj_b = kmeans(x, 12, niter=10, seed=3)
    assert np.array_equal(a, b) and obj_a == obj_b
    c, _ = kmeans(x, 12, niter=10, seed=4)
    assert not np.array_equal(a, c)
    assert obj_a[-1] <= obj_a[0]  # Lloyd never increases the objective


def test_restarts_keep_the_best_objective():
    x = blobs(seed=1)
    single = kmeans(x, 12, niter=5, nredo=1, init="random", seed=0)[1][-1]
    best = kmeans(x, 12, niter=5, nredo=4, init="random", seed=0)[1][-1]
    assert best <= single


def test_assignment_equals_brute_force_nearest_centroid():
    x = blobs(n=2000, dim=39, k=30, seed=2)
    centroids, _ = kmeans(x, 30, niter=5)
    labels, dist = assign(x, centroids)
    d2 = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    brute = d2.argmin(1)
    # Ties aside (none at float64 here), the same centroid, and the same squared distance.
    assert (labels == brute).mean() == 1.0
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-3)


def test_bad_inputs_are_clear_errors():
    x = blobs(n=50)
    with pytest.raises(PretrainError, match="k=100 is larger than the sample"):
        kmeans(x, 100)
    with pytest.raises(PretrainError, match="empty"):
        kmeans(np.zeros((0, 8), np.float32), 3)
    bad = x.copy()
    bad[3, 2] = np.inf
    with pytest.raises(PretrainError, match="non-finite"):
        kmeans(bad, 3)
    with pytest.raises(PretrainError, match="dimension 8, the centroids 39"):
        assign(x, np.zeros((4, 39), np.float32))


@pytest.mark.slow
def test_fit_writes_centroids_with_provenance(small_shards, tmp_path):
    fcfg = load_config(FeaturesMfccConfig, [], [f"shards={small_shards}", f"out={tmp_path / 'f'}", "fraction=0.5"])
    meta = dump_features(fcfg, FeatureSpec.mfcc(), progress=False)
    record = fit(load_config(KmeansFitConfig, [], [f"features={tmp_path / 'f'}", f"out={tmp_path / 'km'}", "k=20",
                                                   "niter=8", "seed=5"]))
    centroids, saved = load_kmeans(tmp_path / "km")
    assert centroids.shape == (20, 39) and saved == record
    assert saved["spec"]["kind"] == "mfcc" and saved["sample"]["sample_sha256"] == meta["sample_sha256"]
    assert saved["sample"]["frames"] == meta["total_frames"] and saved["seed"] == 5
    assert saved["device"] == "cpu" and len(saved["objective"]) == 8
    assert saved["inertia_per_point"] == pytest.approx(saved["objective"][-1] / meta["total_frames"], rel=0.05)
    assert (tmp_path / "km/objective.png").stat().st_size > 1000
    json.loads((tmp_path / "km/kmeans.json").read_text())
    with pytest.raises(PretrainError, match="larger than the sample"):
        fit(load_config(KmeansFitConfig, [], [f"features={tmp_path / 'f'}", f"out={tmp_path / 'k2'}",
                                              f"k={meta['total_frames'] + 1}"]))


def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path):
    from pretrain.cluster.kmeans import faiss_gpus

    if faiss_gpus() > 0:
        pytest.skip("FAISS sees a GPU here")
    with pytest.raises(PretrainError, match="device=gpu, but this FAISS build sees no GPU"):
        fit(load_config(KmeansFitConfig, [], [f"features={tmp_path}", f"out={tmp_path / 'k'}", "device=gpu"]))


@pytest.mark.gpu
def test_gpu_kmeans_matches_the_cpu_objective():
    from pretrain.cluster.kmeans import faiss_gpus

    if faiss_gpus() == 0:
        pytest.skip("FAISS sees no GPU")
    x = blobs(n=20000, dim=32, k=50)
    cpu, _ = kmeans(x, 50, niter=10, seed=0)
    gpu, _ = kmeans(x, 50, niter=10, seed=0, gpu=True)
    i_cpu = assign(x, cpu)[1].sum()
    i_gpu = assign(x, gpu, gpu=True)[1].sum()
    assert abs(i_gpu - i_cpu) / i_cpu < 0.01
