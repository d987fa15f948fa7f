"""Label quality: purities and PNMI as the HuBERT paper defines them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pretrain.cluster.quality import quality, scores
from pretrain.config import load_config
from pretrain.config.cluster import KmeansQualityConfig
from pretrain.utils import PretrainError


def test_a_perfect_clustering_scores_one():
    counts = np.diag([50, 30, 20])[:, [2, 0, 1]]  # clusters are a relabelling of the phones
    s = scores(counts)
    assert s["pnmi"] == pytest.approx(1.0) and s["phone_purity"] == 1.0 and s["cluster_purity"] == 1.0
    assert s["empty_clusters"] == 0


def test_independent_labels_score_zero_pnmi():
    py, pz = np.array([0.5, 0.3, 0.2]), np.array([0.25, 0.25, 0.4, 0.1])
    s = scores(np.round(np.outer(py, pz) * 1e6).astype(np.int64))
    assert s["pnmi"] == pytest.approx(0.0, abs=1e-9)
    assert s["phone_purity"] == pytest.approx(0.5)  # every cluster's best phone is the commonest
    assert s["cluster_purity"] == pytest.approx(0.4)  # every phone's best cluster is the largest


def test_hand_counted_purities_and_usage():
    counts = np.array([[8, 2, 0, 0],
                       [0, 6, 4, 0]])  # 20 frames, cluster 3 unused
    s = scores(counts)
    assert s["phone_purity"] == pytest.approx((8 + 6 + 4) / 20)
    assert s["cluster_purity"] == pytest.approx((8 + 6) / 20)
    assert s["empty_clusters"] == 1
    p = np.array([8, 8, 4]) / 20
    assert s["usage_perplexity"] == pytest.approx(2 ** -(p * np.log2(p)).sum())
    with pytest.raises(PretrainError, match="no frames"):
        scores(np.zeros((2, 2), np.int64))


@pytest.mark.slow
def test_pnmi_equals_scikit_learns_mutual_information_over_the_phone_entropy(small_shards):
    """An independent computation on real clusters of real frames: MFCC k-means (FAISS) of the
    synthetic speech against its phone alignments, at two k."""
    from sklearn.metrics import mutual_info_score

    from pretrain.cluster.kmeans import assign, kmeans
    from pretrain.probe.data import load_eval_set
    from pretrain.probe.features import mfcc_row

    es = load_eval_set(small_shards)
    x = np.ascontiguousarray(mfcc_row([u.audio for u in es.utterances]).layers[0])
    y = np.concatenate([u.phones for u in es.utterances])
    for k in (20, 100):
        centroids, _ = kmeans(x, k, seed=0)
        z, _ = assign(x, centroids)
        counts = np.zeros((y.max() + 1, k), dtype=np.int64)
        np.add.at(counts, (y, z), 1)
        p = np.bincount(y) / len(y)
        h_y = -(p[p > 0] * np.log(p[p > 0])).sum()
        assert scores(counts)["pnmi"] == pytest.approx(mutual_info_score(y, z) / h_y, abs=1e-9)
        assert 0.2 < scores(counts)["pnmi"] < 0.9


@pytest.mark.slow
def test_report_on_the_synthetic_corpus(small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    cfg = load_config(KmeansQualityConfig, [], [f"shards={shards}", "labels=phones100", "reference=phones100",
                                                 f"out={tmp_path / 'q'}"])
    report = quality(cfg)
    assert report["pnmi"] == pytest.approx(1.0)  # the alignments against themselves
    assert (tmp_path / "q/cooccurrence.png").stat().st_size > 1000 and (tmp_path / "q/usage.png").is_file()
    with pytest.raises(PretrainError, match="at 50 Hz and 'phones100' at 100 Hz"):
        quality(load_config(KmeansQualityConfig, [], [f"shards={shards}", "labels=phones50",
                                                      "reference=phones100", f"out={tmp_path / 'q2'}"]))
