"""``pretrain features mfcc|model``: the bounded, seeded sample of frames k-means is fitted on.

Layout of a features folder::

    plan.json            the spec (kind, checkpoint sha256, layer), the shards and their sha256,
                         fraction, max_frames, seed, dtype; a rerun with another plan is refused
    <shard>.npy          (frames, dim) float32/float16, the shard's sampled frames
    <shard>.json         keys, frames taken per key, frames per key, the .npy's sha256
    meta.json            written when every shard is done: the plan plus per-shard entries and
                         totals (``sample_sha256`` identifies the sample in k-means provenance)

The unit of work is a shard, so any number of local processes, torchrun ranks or SLURM array
tasks can share the shards (shard ``i`` goes to task ``i % num_tasks``); a shard whose
``.json`` exists and whose ``.npy`` matches its sha256 is skipped, and the task that finds all
shards done writes ``meta.json``. Memory per process is one shard's sampled frames.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from pretrain.config.cluster import FeaturesMfccConfig
from pretrain.data.shards import read_manifest
from pretrain.utils import PretrainError, atomic_write_bytes, atomic_write_json, sha256_file
from pretrain.features.extract import (Extractor, FeatureSpec, check_features, run_shards,
                                      shard_utterances, task_split)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def in_sample(seed: int, key: str, fraction: float) -> bool:
    """Whether utterance ``key`` is sampled: a hash of (seed, key) below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _plan(cfg: FeaturesMfccConfig, spec: FeatureSpec) -> dict:
    manifest = read_manifest(cfg.shards)
    return {"format_version": FORMAT_VERSION, "spec": spec.to_dict(), "shards_dir": str(Path(cfg.shards).resolve()),
            "shards": [[s["name"], s["utterances"], s["seconds"], s["sha256"]] for s in manifest["shards"]],
            "fraction": cfg.fraction, "max_frames": cfg.max_frames, "seed": cfg.seed, "dtype": cfg.dtype}


def _budgets(plan: dict) -> list[int | None]:
    if plan["max_frames"] is None:
        return [None] * len(plan["shards"])
    total = sum(s[2] for s in plan["shards"]) or 1.0
    return [int(plan["max_frames"] * s[2] / total) for s in plan["shards"]]


def _shard_done(out: Path, name: str) -> bool:
    index = out / f"{name}.json"
    if not index.is_file():
        return False
    try:
        record = json.loads(index.read_text())
        return sha256_file(out / f"{name}.npy") == record["sha256"]
    except (OSError, ValueError, KeyError):
        return False


_EXTRACTOR: Extractor | None = None


def _worker_init(spec: dict, device: str, batch_samples: int, threads: int | None) -> None:
    global _EXTRACTOR
    if threads:
        import torch  # here, not at the top: MFCC workers never need it (2 s of start-up each)

        torch.set_num_threads(threads)
    _EXTRACTOR = Extractor(FeatureSpec.from_dict(spec), device, batch_samples)


def dump_shard(out: str, plan: dict, index: int, budget: int | None) -> dict:
    """Sample, compute and write one shard's features (in a worker with an extractor)."""
    assert _EXTRACTOR is not None
    name = plan["shards"][index][0]
    spec = _EXTRACTOR.spec
    shard = Path(plan["shards_dir"]) / name
    keys, waves = [], []
    for key, wave in shard_utterances(shard):
        if in_sample(plan["seed"], key, plan["fraction"]):
            keys.append(key)
            waves.append(wave)
    feats = _EXTRACTOR(waves) if waves else []
    for key, wave, f in zip(keys, waves, feats):
        check_features(f, spec, len(wave), f"shard {name}, key '{key}'")
    frames = [len(f) for f in feats]
    x = np.concatenate(feats) if feats else np.zeros((0, spec.dim), np.float32)
    owner = np.repeat(np.arange(len(keys)), frames)
    if budget is not None and len(x) > budget:
        keep = np.sort(np.random.default_rng([plan["seed"], index]).choice(len(x), budget, replace=False))
        x, owner = x[keep], owner[keep]
    taken = np.bincount(owner, minlength=len(keys)).tolist()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x.astype(plan["dtype"])))
    atomic_write_bytes(Path(out) / f"{name}.npy", buf.getvalue())
    record = {"shard": name, "keys": keys, "frames": frames, "taken": taken, "total": int(len(x)),
              "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    atomic_write_json(Path(out) / f"{name}.json", record)
    return record


def _dump_index(out: str, plan: dict, budgets: list, index: int) -> dict:
    return dump_shard(out, plan, index, budgets[index])


def dump_features(cfg: FeaturesMfccConfig, spec: FeatureSpec, progress: bool = True) -> dict | None:
    """Dump this task's shards; returns ``meta`` once every shard of the plan is done."""
    out = Path(cfg.out)
    plan = _plan(cfg, spec)
    plan_path = out / "plan.json"
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan.get(k))
            raise PretrainError(f"{out} holds features of another plan (differs in: {', '.join(changed)}); "
                                "use another out folder or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan_path, plan)

    task, num_tasks = task_split(cfg.task, cfg.num_tasks)
    budgets = _budgets(plan)
    names = [s[0] for s in plan["shards"]]
    mine = [i for i in range(len(names)) if i % num_tasks == task]
    todo = [i for i in mine if not _shard_done(out, names[i])]
    log.info("features: %s; task %d/%d has %d shards, %d to do", spec.describe(), task, num_tasks,
             len(mine), len(todo))
    work = functools.partial(_dump_index, str(out), plan, budgets)
    run_shards(todo, work, _worker_init, (spec.to_dict(), cfg.device, cfg.batch_samples), cfg.jobs,
               progress, "features")
    return finish(out)


def finish(out: Path) -> dict | None:
    """Write ``meta.json`` if every shard is done; returns it (or None)."""
    plan = json.loads((out / "plan.json").read_text())
    names = [s[0] for s in plan["shards"]]
    if not all(_shard_done(out, n) for n in names):
        return None
    records = [json.loads((out / f"{n}.json").read_text()) for n in names]
    sample = hashlib.sha256("".join(r["sha256"] for r in records).encode()).hexdigest()
    meta = {**plan, "per_shard": {r["shard"]: {"utterances": len(r["keys"]), "frames": r["total"],
                                                "sha256": r["sha256"]} for r in records},
            "total_frames": sum(r["total"] for r in records),
            "total_utterances": sum(len(r["keys"]) for r in records), "sample_sha256": sample}
    atomic_write_json(out / "meta.json", meta)
    return meta


def load_sample(features: str | Path) -> tuple[np.ndarray, dict]:
    """All sampled frames as one float32 array (the shards' .npy files are memory-mapped and
    copied once), with the folder's meta. Errors name the folder or shard at fault."""
    folder = Path(features)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise PretrainError(f"{folder} has no meta.json: the features are missing or unfinished "
                            "(run pretrain features ... until every shard is done)")
    meta = json.loads(meta_path.read_text())
    dim = meta["spec"]["dim"]
    total = meta["total_frames"]
    x = np.empty((total, dim), dtype=np.float32)
    at = 0
    for name, entry in meta["per_shard"].items():
        part = np.load(folder / f"{name}.npy", mmap_mode="r")
        if part.ndim != 2 or part.shape[1] != dim or len(part) != entry["frames"]:
            raise PretrainError(f"{folder / name}.npy has shape {part.shape}, meta.json says "
                                f"({entry['frames']}, {dim})")
        x[at:at + len(part)] = part
        if not np.isfinite(x[at:at + len(part)]).all():
            raise PretrainError(f"{folder / name}.npy holds non-finite values")
        at += len(part)
    return x, meta
