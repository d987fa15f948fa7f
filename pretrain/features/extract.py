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
from pretrain.data.shards import iter_shard
from pretrain.utils import PretrainError, sha256_file
from pretrain.features.mfcc import DIM as MFCC_DIM
from pretrain.features.mfcc import mfcc_39
from pretrain.frames import num_frames


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
        from pretrain.model.checkpoint import load_model, resolve_model_file

        path = resolve_model_file(checkpoint)
        model = load_model(path)
        layers = model.cfg.encoder_layers
        if not 1 <= layer <= layers:
            raise PretrainError(f"layer {layer} does not exist: {path} has {layers} Transformer layers")
        return cls("model", 50, model.cfg.encoder_embed_dim, str(path.resolve()), sha256_file(path), layer,
                   chunk_seconds, chunk_context)

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
            from pretrain.model.encoder import batch_invariant

            if sha256_file(spec.checkpoint) != spec.checkpoint_sha256:
                raise PretrainError(f"{spec.checkpoint} changed since these features were defined "
                                    "(sha256 differs); refit or point at the original checkpoint")
            self.device = resolve_device(device)
            self.model = load_model(spec.checkpoint, map_location=self.device).eval()
            self.torch = torch
            if not batch_invariant(self.model.cfg):
                # e.g. BASE's first conv layer normalizes over the whole (padded) time axis, so
                # padding would change a shorter utterance's features (by up to 0.3 here):
                # one utterance per forward, as fairseq's feature dumper does.
                self.batch_samples = 0

    def __call__(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        if self.spec.kind == "mfcc":
            return [mfcc_39(w) for w in waveforms]
        return self._model_features(waveforms)

    def _utterance_statistics(self, wave: np.ndarray) -> tuple | None:
        """Per-channel mean and variance of the first convolution's output over the whole
        utterance, streamed (a BASE-style GroupNorm normalizes each channel over all of time: in
        a window it would see other statistics); None when the model has no such norm."""
        torch = self.torch
        layer = self.model.backbone.feature_extractor.conv_layers[0] if self.model.cfg.frontend == "conv" else None
        if layer is None or layer.norm != "group":
            return None
        kernel, stride = layer.conv.kernel_size[0], layer.conv.stride[0]
        outputs = (len(wave) - kernel) // stride + 1
        piece = stride * 200_000  # 2 s of output frames at a time
        s1 = torch.zeros(layer.conv.out_channels, dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        done = 0
        with torch.no_grad():
            while done < outputs:
                take = min(piece // stride, outputs - done)
                start = done * stride
                segment = torch.from_numpy(np.ascontiguousarray(wave[start:start + (take - 1) * stride + kernel]))
                y = layer.conv(segment[None, None].to(self.device)).double().cpu()[0]
                s1 += y.sum(-1)
                s2 += (y ** 2).sum(-1)
                done += take
        mean = s1 / outputs
        return mean.float(), (s2 / outputs - mean ** 2).clamp_min(0).float()

    def _chunked(self, wave: np.ndarray) -> np.ndarray:
        """One long utterance in windows: each contributes ``chunk_seconds`` of frames and sees
        ``chunk_context`` more on either side; window starts sit on the 320-sample frame grid,
        so window frame j is utterance frame start/320 + j. What the model normalizes over the
        whole utterance (the waveform with ``normalize_waveform``, a BASE GroupNorm's channels)
        is normalized with the whole utterance's statistics, not the window's."""
        torch = self.torch
        backbone = self.model.backbone
        if backbone.cfg.normalize_waveform:
            wave = ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)
        stats = self._utterance_statistics(wave)
        hook = None
        if stats is not None:
            mean, var = (t.to(self.device) for t in stats)
            norm = backbone.feature_extractor.conv_layers[0].layer_norm

            def global_norm(module, inputs, output):
                x = inputs[0]
                scale = (module.weight / torch.sqrt(var + module.eps)).to(x.dtype)
                return (x - mean[None, :, None].to(x.dtype)) * scale[None, :, None] + module.bias[None, :, None].to(x.dtype)

            hook = norm.register_forward_hook(global_norm)
        normalize, backbone.cfg.normalize_waveform = backbone.cfg.normalize_waveform, False
        try:
            return self._windows(wave)
        finally:
            backbone.cfg.normalize_waveform = normalize
            if hook is not None:
                hook.remove()

    def _windows(self, wave: np.ndarray) -> np.ndarray:
        torch = self.torch
        core = max(1, int(self.spec.chunk_seconds * 16000) // 320) * 320
        context = int(self.spec.chunk_context * 16000) // 320 * 320
        total = num_frames(len(wave), 50)
        parts = []
        for start in range(0, len(wave), core):
            first, last = start // 320, min((start + core) // 320, total)
            if first >= last:
                break
            # + 80: a frame's 400-sample receptive field reaches 80 samples past its 320-sample hop
            lo, hi = max(0, start - context), min(len(wave), start + core + context + 80)
            audio = torch.from_numpy(np.ascontiguousarray(wave[lo:hi]))[None]
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                hidden, _ = self.model.backbone.hidden_states(audio.to(self.device), torch.tensor([hi - lo]).to(self.device),
                                                              layer=self.spec.layer)
            offset = lo // 320
            parts.append(hidden[0, first - offset:last - offset].float().cpu().numpy())
        return np.concatenate(parts)

    def _model_features(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        out: list[np.ndarray | None] = [None] * len(waveforms)
        limit = (self.spec.chunk_seconds + 2 * self.spec.chunk_context) * 16000
        for i, wave in enumerate(waveforms):
            if len(wave) > limit:
                out[i] = self._chunked(wave)
        order = sorted((i for i in range(len(waveforms)) if out[i] is None), key=lambda i: len(waveforms[i]))
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
