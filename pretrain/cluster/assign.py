"""``pretrain kmeans assign``: labels for every utterance of every shard, as keyed sidecars.

The features are those the centroids were fitted on (the spec in ``kmeans.json``: MFCC, or a
checkpoint's layer whose sha256 must still match). Each shard is read once, its utterances'
features computed a few at a time and assigned to the nearest centroid with FAISS, and its
labels written as ``<shards>/labels/<name>/<shard>.npz`` (``pretrain.data.labels``) plus a
record ``.assign/<shard>.json`` of the centroids it used and the file's sha256. A shard whose
record names the same centroids and whose file matches is skipped, so a rerun, a requeued array
task or another process count only does what is missing. The task that finds every shard done
writes ``meta.json`` (last, so a half-made label set is never read as complete). Assigning other
centroids to an existing name first removes its ``meta.json``, with a warning.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np

from pretrain.cluster.kmeans import assign, load_kmeans
from pretrain.config.cluster import KmeansAssignConfig
from pretrain.data.labels import LabelError, label_dir, write_label_meta, write_label_shard
from pretrain.data.shards import read_manifest
from pretrain.utils import atomic_write_json, sha256_file
from pretrain.features.extract import (Extractor, FeatureSpec, check_features, run_shards,
                                       shard_utterances, task_split)

log = logging.getLogger(__name__)

CHUNK_SAMPLES = 16000 * 120
"""Utterances are featurized and assigned in chunks of about two minutes of audio."""

_STATE: dict = {}


def _init(spec: dict, centroids: np.ndarray, device: str, batch_samples: int, threads: int | None) -> None:
    if threads:
        import torch  # here, not at the top: MFCC workers never need it (2 s of start-up each)

        torch.set_num_threads(threads)
    _STATE["extractor"] = Extractor(FeatureSpec.from_dict(spec), device, batch_samples)
    _STATE["centroids"] = centroids


def _record_path(shards: Path, name: str, shard: str) -> Path:
    return label_dir(shards, name) / ".assign" / f"{shard}.json"


def _done(shards: Path, name: str, shard: dict, centroids_sha: str) -> dict | None:
    path = _record_path(shards, name, shard["name"])
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        npz = label_dir(shards, name) / (shard["name"].removesuffix(".tar") + ".npz")
        ok = (record["centroids_sha256"] == centroids_sha and record["entry"]["utterances"] == shard["utterances"]
              and sha256_file(npz) == record["entry"]["sha256"])
    except (OSError, ValueError, KeyError):
        return None
    return record["entry"] if ok else None


def assign_shard(shards: str, name: str, centroids_sha: str, shard: str) -> dict:
    labels = shard_labels(_STATE["extractor"], _STATE["centroids"], Path(shards), shard)
    entry = write_label_shard(shards, name, shard, labels)
    atomic_write_json(_record_path(Path(shards), name, shard), {"centroids_sha256": centroids_sha, "entry": entry})
    return entry


def shard_labels(extractor: Extractor, centroids: np.ndarray, shards: Path, shard: str) -> dict[str, np.ndarray]:
    """Every utterance of one shard, featurized a chunk at a time and assigned to its nearest
    centroid: {key: labels}."""
    spec = extractor.spec
    labels: dict[str, np.ndarray] = {}
    chunk: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        feats = extractor([w for _, w in chunk])
        for (key, wave), f in zip(chunk, feats):
            check_features(f, spec, len(wave), f"shard {shard}, key '{key}'")
        ids, _ = assign(np.concatenate(feats), centroids)
        at = 0
        for (key, _), f in zip(chunk, feats):
            labels[key] = ids[at:at + len(f)].astype(np.int32)
            at += len(f)
        chunk.clear()

    size = 0
    for key, wave in shard_utterances(shards / shard):
        if key in labels or any(key == k for k, _ in chunk):
            raise ValueError(f"shard {shard}: key '{key}' occurs twice")
        chunk.append((key, wave))
        size += len(wave)
        if size >= CHUNK_SAMPLES:
            flush()
            size = 0
    if chunk:
        flush()
    return labels


def assign_labels(cfg: KmeansAssignConfig, progress: bool = True) -> dict | None:
    """Label this task's shards; returns the label set's meta once every shard is done."""
    centroids, record = load_kmeans(cfg.kmeans, cfg.checkpoint)
    shards_dir = Path(cfg.shards)
    shards = read_manifest(shards_dir)["shards"]
    sha = record["centroids_sha256"]
    provenance = {"made_by": "pretrain kmeans assign", "kmeans": str(Path(cfg.kmeans).resolve()),
                  "centroids_sha256": sha, "spec": record["spec"], "k": record["k"],
                  "sample_sha256": record["sample"]["sample_sha256"]}
    folder = label_dir(shards_dir, cfg.name)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("provenance", {}).get("centroids_sha256") != sha:
            if not cfg.overwrite:
                maker = old.get("provenance", {}).get("made_by") or "someone else"
                raise LabelError(f"label set {folder} already exists (made by {maker}, not from the centroids of "
                                 f"{cfg.kmeans}); set overwrite=true to replace it, or choose another name")
            log.warning("label set '%s' was made from other centroids; replacing it (overwrite=true)", cfg.name)
            meta_path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)

    task, num_tasks = task_split(cfg.task, cfg.num_tasks)
    mine = [s for i, s in enumerate(shards) if i % num_tasks == task]
    todo = [s["name"] for s in mine if _done(shards_dir, cfg.name, s, sha) is None]
    log.info("assign: %s -> label set '%s'; task %d/%d has %d shards, %d to do",
             FeatureSpec.from_dict(record["spec"]).describe(), cfg.name, task, num_tasks, len(mine), len(todo))
    work = functools.partial(assign_shard, str(shards_dir), cfg.name, sha)
    run_shards(todo, work, _init, (record["spec"], centroids, cfg.device, cfg.batch_samples), cfg.jobs,
               progress, "assign")
    entries = {s["name"]: _done(shards_dir, cfg.name, s, sha) for s in shards}
    if any(e is None for e in entries.values()):
        return None
    write_label_meta(shards_dir, cfg.name, record["spec"]["rate"], record["k"], entries, provenance)
    return json.loads(meta_path.read_text())
