"""``pretrain kmeans quality``: how well cluster labels match phone alignments.

With ``p(y, z)`` the joint distribution of reference phone ``y`` and cluster ``z`` over all
frames (HuBERT paper, section IV-F):

- phone purity ``= sum_z max_y p(y, z)`` (how pure each cluster is, weighted by its size);
- cluster purity ``= sum_y max_z p(y, z)`` (how concentrated each phone is);
- PNMI ``= I(y; z) / H(y)``: the share of the phone's uncertainty a cluster removes
  (1 when clusters determine phones, 0 when independent).

Label usage: the entropy of ``p(z)`` (bits), its perplexity ``2^H`` (the number of clusters in
effective use) and the number of clusters never used. Only the label sidecars are read (no
audio); both label sets must be at the same rate, and their frames are matched by utterance key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.cluster.assign import shard_labels
from pretrain.cluster.kmeans import load_kmeans
from pretrain.config.cluster import KmeansQualityConfig
from pretrain.data.labels import LabelError, LabelSet
from pretrain.data.shards import read_manifest
from pretrain.features.extract import Extractor, FeatureSpec
from pretrain.phones import PHONES
from pretrain.utils import PretrainError, atomic_write_json


def joint_counts(shards: str | Path, labels: str, reference: str) -> tuple[np.ndarray, LabelSet, LabelSet]:
    """(reference classes, clusters) frame counts over every shard."""
    hyp, ref = LabelSet(shards, labels), LabelSet(shards, reference)
    if hyp.label_rate != ref.label_rate:
        raise PretrainError(f"label set '{labels}' is at {hyp.label_rate} Hz and '{reference}' at "
                            f"{ref.label_rate} Hz; compare sets at the same rate (e.g. phones{hyp.label_rate})")
    counts = np.zeros((ref.num_classes, hyp.num_classes), dtype=np.int64)
    for shard in read_manifest(shards)["shards"]:
        h, r = hyp.load_shard(shard["name"]), ref.load_shard(shard["name"])
        if set(h) != set(r):
            missing = sorted(set(r) ^ set(h))[:3]
            raise LabelError(f"shard {shard['name']}: label sets '{labels}' and '{reference}' cover different "
                             f"keys (e.g. {missing})")
        for key, z in h.items():
            y = r[key]
            n = min(len(y), len(z))
            if abs(len(y) - len(z)) > 1:
                raise LabelError(f"shard {shard['name']}, key '{key}': {len(z)} '{labels}' labels vs "
                                 f"{len(y)} '{reference}' labels")
            np.add.at(counts, (y[:n], z[:n]), 1)
    return counts, hyp, ref


def scores(counts: np.ndarray) -> dict:
    """Purities, PNMI and usage from a (reference, cluster) count matrix."""
    total = counts.sum()
    if total == 0:
        raise PretrainError("no frames to score")
    p = counts / total
    py, pz = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (py[:, None] * pz[None, :])[nz])).sum())
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    hz_bits = float(-(pz[pz > 0] * np.log2(pz[pz > 0])).sum())
    return {
        "frames": int(total),
        "phone_purity": float(p.max(0).sum()),
        "cluster_purity": float(p.max(1).sum()),
        "pnmi": mi / hy if hy > 0 else 0.0,
        "usage_entropy_bits": hz_bits,
        "usage_perplexity": 2.0 ** hz_bits,
        "empty_clusters": int((pz == 0).sum()),
        "clusters": int(counts.shape[1]),
        "reference_classes_seen": int((py > 0).sum()),
    }


def kmeans_counts(shards: str | Path, kmeans_dir: str | Path, reference: str,
                  progress: bool = True, checkpoint: str | None = None) -> tuple[np.ndarray, dict, LabelSet]:
    """(reference classes, clusters) frame counts of the labels a k-means gives these shards,
    computed in memory: the held-out score of a k-means fitted elsewhere."""
    centroids, record = load_kmeans(kmeans_dir, checkpoint)
    spec = FeatureSpec.from_dict(record["spec"])
    ref = LabelSet(shards, reference)
    if spec.rate % ref.label_rate:
        raise PretrainError(f"k-means {kmeans_dir} labels at {spec.rate} Hz cannot be scored against "
                            f"'{reference}' at {ref.label_rate} Hz")
    step = spec.rate // ref.label_rate
    extractor = Extractor(spec)
    counts = np.zeros((ref.num_classes, len(centroids)), dtype=np.int64)
    names = [s["name"] for s in read_manifest(shards)["shards"]]
    for name in tqdm(names, desc=f"score {Path(kmeans_dir).name}", unit="shard", disable=not progress):
        y_shard = ref.load_shard(name)
        for key, z in shard_labels(extractor, centroids, Path(shards), name).items():
            if key not in y_shard:
                raise LabelError(f"shard {name}, key '{key}': no '{reference}' labels")
            # A 100 Hz frame 2i has the centre of 50 Hz frame i.
            z, y = z[::step], y_shard[key]
            if abs(len(y) - len(z)) > 1:
                raise LabelError(f"shard {name}, key '{key}': {len(z)} labels from {kmeans_dir} vs "
                                 f"{len(y)} '{reference}' labels")
            n = min(len(y), len(z))
            np.add.at(counts, (y[:n], z[:n]), 1)
    return counts, record, ref


def quality(cfg: KmeansQualityConfig, progress: bool = True) -> dict:
    if cfg.kmeans is not None:
        counts, record, ref = kmeans_counts(cfg.shards, cfg.kmeans, cfg.reference, progress, cfg.checkpoint)
        report = {"labels": None, "kmeans": str(Path(cfg.kmeans).resolve()), "reference": cfg.reference,
                  "label_rate": ref.label_rate, "provenance": {"spec": record["spec"], "k": record["k"],
                                                               "centroids_sha256": record["centroids_sha256"]},
                  **scores(counts)}
    else:
        counts, hyp, ref = joint_counts(cfg.shards, cfg.labels, cfg.reference)
        report = {"labels": cfg.labels, "reference": cfg.reference, "label_rate": hyp.label_rate,
                  "provenance": hyp.meta.get("provenance", {}), **scores(counts)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    names = _reference_names(ref)
    _plot_cooccurrence(counts, names, out / "cooccurrence.png", report)
    _plot_usage(counts.sum(0), out / "usage.png", report)
    with open(out / "counts.npy.tmp", "wb") as f:
        np.save(f, counts)
    (out / "counts.npy.tmp").replace(out / "counts.npy")
    # Last: quality.json marks a finished report (pretrain iterate relies on it).
    atomic_write_json(out / "quality.json", report)
    return report


def _reference_names(ref: LabelSet) -> list[str]:
    if ref.name.startswith("phones") and len(PHONES) == ref.num_classes:
        return list(PHONES)
    return [str(i) for i in range(ref.num_classes)]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _plot_cooccurrence(counts: np.ndarray, names: list[str], path: Path, report: dict) -> None:
    """p(phone | cluster), clusters ordered by their most likely phone: a clean clustering
    shows as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = np.flatnonzero(counts.sum(0))
    cond = counts[:, used] / counts[:, used].sum(0, keepdims=True)
    order = np.lexsort((-cond.max(0), cond.argmax(0)))
    fig, ax = plt.subplots(figsize=(max(6, len(used) / 12), max(4, len(names) / 5)))
    ax.imshow(cond[:, order], aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel(f"cluster ({len(used)} used, ordered by most likely phone)")
    ax.set_title(f"p(phone | cluster) — {report['labels'] or Path(report['kmeans']).parent.name}: PNMI {report['pnmi']:.3f}, "
                 f"phone purity {report['phone_purity']:.3f}")
    fig.tight_layout()
    _save(fig, path)


def _plot_usage(cluster_counts: np.ndarray, path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = np.sort(cluster_counts)[::-1] / max(cluster_counts.sum(), 1)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(share)), share, width=1.0)
    ax.set_xlabel("cluster (by frequency)")
    ax.set_ylabel("share of frames")
    ax.set_title(f"label usage: perplexity {report['usage_perplexity']:.1f} of {report['clusters']}, "
                 f"{report['empty_clusters']} empty")
    fig.tight_layout()
    _save(fig, path)


def load_report(out: str | Path) -> dict:
    return json.loads((Path(out) / "quality.json").read_text())
