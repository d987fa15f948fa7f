"""Frame features of utterances: MFCC (100 Hz) or a trained model's layer (50 Hz).

A :class:`FeatureSpec` names the features; it is recorded with every sample and every set of
centroids, so that ``kmeans assign`` computes exactly the features the centroids were fitted
on. Every utterance gets ``pretrain.frames.num_frames(len, rate)`` frames, the count the label
reader expects.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pretrain.data.audio import EXTENSIONS, decode
from pretrain.data.shards import iter_shard, sha256_file
from pretrain.features.mfcc import DIM as MFCC_DIM
from pretrain.features.mfcc import mfcc_39
from pretrain.frames import num_frames
from pretrain.utils import PretrainError


@dataclass
class FeatureSpec:
    kind: str
    """``mfcc`` or ``model``."""
    rate: int
    dim: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    layer: int | None = None

    @classmethod
    def mfcc(cls) -> "FeatureSpec":
        return cls("mfcc", 100, MFCC_DIM)

    @classmethod
    def model(cls, checkpoint: str, layer: int) -> "FeatureSpec":
        from pretrain.model.checkpoint import load_model, resolve_model_file

        path = resolve_model_file(checkpoint)
        model = load_model(path)
        layers = model.cfg.encoder_layers
        if not 1 <= layer <= layers:
            raise PretrainError(f"layer {layer} does not exist: {path} has {layers} Transformer layers")
        return cls("model", 50, model.cfg.encoder_embed_dim, str(path.resolve()), sha256_file(path), layer)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)

    def describe(self) -> str:
        return "MFCC (39-dim, 100 Hz)" if self.kind == "mfcc" else \
            f"layer {self.layer} of {self.checkpoint} ({self.dim}-dim, 50 Hz)"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PretrainError("device=cuda, but torch sees no CUDA GPU")
    return device


class Extractor:
    """Computes a spec's features for lists of waveforms (float32 in [-1, 1], 16 kHz)."""

    def __init__(self, spec: FeatureSpec, device: str = "auto", batch_samples: int = 1_600_000):
        self.spec = spec
        self.batch_samples = batch_samples
        self.model = None
        if spec.kind == "model":
            import torch

            from pretrain.model.checkpoint import load_model

            if sha256_file(spec.checkpoint) != spec.checkpoint_sha256:
                raise PretrainError(f"{spec.checkpoint} changed since these features were defined "
                                    "(sha256 differs); refit or point at the original checkpoint")
            self.device = resolve_device(device)
            self.model = load_model(spec.checkpoint, map_location=self.device).eval()
            self.torch = torch
            if self.model.cfg.frontend == "conv" and self.model.cfg.extractor_mode == "group_norm":
                # BASE's first conv layer normalizes over the whole (padded) time axis, so
                # padding would change a shorter utterance's features (by up to 0.3 here):
                # one utterance per forward, as fairseq's feature dumper does.
                self.batch_samples = 0

    def __call__(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        if self.spec.kind == "mfcc":
            return [mfcc_39(w) for w in waveforms]
        return self._model_features(waveforms)

    def _model_features(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        out: list[np.ndarray | None] = [None] * len(waveforms)
        order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
        batch: list[int] = []

        def run(indices: list[int]) -> None:
            longest = len(waveforms[indices[-1]])
            audio = torch.zeros(len(indices), longest)
            for row, i in enumerate(indices):
                audio[row, :len(waveforms[i])] = torch.from_numpy(waveforms[i])
            lengths = torch.tensor([len(waveforms[i]) for i in indices])
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                hidden, _ = self.model.backbone.hidden_states(audio.to(self.device), lengths.to(self.device),
                                                              layer=self.spec.layer)
            hidden = hidden.float().cpu().numpy()
            for row, i in enumerate(indices):
                out[i] = hidden[row, :num_frames(len(waveforms[i]), 50)].copy()

        for i in order:  # sorted by length: the batch's padded size is its last item's
            if batch and (len(batch) + 1) * len(waveforms[i]) > self.batch_samples:
                run(batch)
                batch = []
            batch.append(i)
        if batch:
            run(batch)
        return out  # type: ignore[return-value]


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
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

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
