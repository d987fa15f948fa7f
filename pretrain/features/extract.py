"""Frame features of utterances: MFCC (100 Hz) or a trained model's layer (50 Hz).

A :class:`FeatureSpec` names the features; it is recorded with every sample and every set of
centroids, so that ``kmeans assign`` computes exactly the features the centroids were fitted
on. Every utterance gets ``pretrain.frames.num_frames(len, rate)`` frames, the count the label
reader expects.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pretrain.data.audio import EXTENSIONS, decode
from pretrain.data.shards import iter_shard
from pretrain.features.mfcc import DIM as MFCC_DIM
from pretrain.features.mfcc import mfcc_39
from pretrain.frames import num_frames
from pretrain.utils import PretrainError, sha256_file


@dataclass
class FeatureSpec:
    kind: str
    """``mfcc`` or ``model``."""
    rate: int
    dim: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    layer: int | None = None
    chunk_seconds: float = 30.0
    """Model features: utterances longer than this (plus twice the context) are run in
    windows, so that memory stays bounded (the Transformer's attention grows with the square of
    the length: a 10-minute LibriLight file is 30,000 frames)."""
    chunk_context: float = 5.0
    """Seconds of audio each window sees on either side of the frames it contributes."""

    @classmethod
    def mfcc(cls) -> "FeatureSpec":
        return cls("mfcc", 100, MFCC_DIM)

    @classmethod
    def model(cls, checkpoint: str, layer: int, chunk_seconds: float = 30.0, chunk_context: float = 5.0
              ) -> "FeatureSpec":
        from pretrain.model.checkpoint import load_model, resolve_model_file  # torch: model features only

        path = resolve_model_file(checkpoint)
        cfg = load_model(path).cfg
        if not 1 <= layer <= cfg.encoder_layers:
            raise PretrainError(f"layer {layer} does not exist: {path} has {cfg.encoder_layers} Transformer layers")
        return cls("model", 50, cfg.encoder_embed_dim, str(path.resolve()), sha256_file(path), layer,
                   chunk_seconds, chunk_context)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)

    def describe(self) -> str:
        return "MFCC (39-dim, 100 Hz)" if self.kind == "mfcc" else \
            f"layer {self.layer} of {self.checkpoint} ({self.dim}-dim, 50 Hz)"


class Extractor:
    """Computes a spec's features for lists of waveforms (float32 in [-1, 1], 16 kHz); a model's
    layer through :class:`pretrain.model.states.LayerStates`, the one reader of layer states."""

    def __init__(self, spec: FeatureSpec, device: str = "auto", batch_samples: int = 1_600_000):
        self.spec = spec
        self.states = None
        if spec.kind == "model":
            # Here, not at the top: MFCC features and their labels never load torch, which
            # costs 2 s at the start of every stage process and pool worker.
            from pretrain.model.states import LayerStates

            self.states = LayerStates(spec.checkpoint, device, spec.checkpoint_sha256, batch_samples,
                                      spec.chunk_seconds, spec.chunk_context)

    def __call__(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        if self.states is None:
            return [mfcc_39(w) for w in waveforms]
        return self.states(waveforms, [self.spec.layer])[self.spec.layer]


def shard_utterances(shard_path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, waveform) of every utterance of a shard, in stored order."""
    for sample in iter_shard(shard_path):
        ext = next((e for e in EXTENSIONS if e in sample), None)
        if ext is None:
            raise PretrainError(f"{shard_path}: sample '{sample['__key__']}' has no audio member")
        yield sample["__key__"], decode(sample[ext])


def check_features(feats: np.ndarray, spec: FeatureSpec, num_samples: int, where: str) -> None:
    expected = num_frames(num_samples, spec.rate)
    if feats.shape != (expected, spec.dim):
        raise PretrainError(f"{where}: features of shape {feats.shape}, expected ({expected}, {spec.dim})")
    if not np.isfinite(feats).all():
        raise PretrainError(f"{where}: non-finite feature values")


def task_split(task: int | None, num_tasks: int | None) -> tuple[int, int]:
    """This process's (task, num_tasks): explicit, a SLURM array task, a torchrun rank, or (0, 1)."""
    env = os.environ
    if num_tasks is None:
        if "SLURM_ARRAY_TASK_COUNT" in env:
            num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            num_tasks = int(env.get("WORLD_SIZE", 1))
    if task is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            task = int(env.get("RANK", 0))
    if not 0 <= task < num_tasks:
        raise PretrainError(f"task {task} is not in [0, {num_tasks})")
    return task, num_tasks


def run_shards(todo: list, work, init, initargs: tuple, jobs: int, progress: bool, desc: str) -> list:
    """``work(item)`` for every item, in this process (jobs 1) or a pool of ``jobs`` spawned
    workers each set up once by ``init(*initargs, threads)``; a progress bar per item."""
    jobs = max(1, min(jobs or multiprocessing.cpu_count(), len(todo)))
    results = []
    with tqdm(total=len(todo), desc=desc, unit="shard", disable=not progress) as bar:
        if jobs == 1:
            init(*initargs, None)
            for item in todo:
                results.append(work(item))
                bar.update()
        else:
            # spawn: a forked child of a process that ran OpenMP code (FAISS, torch) can hang.
            threads = max(1, multiprocessing.cpu_count() // jobs)
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=init, initargs=(*initargs, threads)) as pool:
                for future in [pool.submit(work, item) for item in todo]:
                    results.append(future.result())
                    bar.update()
    return results
