"""Configuration of the clustering stage: ``pretrain features mfcc|model`` and
``pretrain kmeans fit|assign|quality``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError, check_name


@dataclass
class ParallelConfig:
    jobs: int = 1
    """Worker processes on this machine, one shard at a time each; 0 uses every core. Model
    features on a GPU want 1 per GPU (use ranks or array tasks for more GPUs)."""

    task: Optional[int] = None
    """This task's index among ``num_tasks`` (shards ``i`` with ``i % num_tasks == task``).
    Unset: ``SLURM_ARRAY_TASK_ID`` (minus ``SLURM_ARRAY_TASK_MIN``) under a SLURM array, else
    torchrun's ``RANK``, else 0."""

    num_tasks: Optional[int] = None
    """How many tasks share the shards. Unset: ``SLURM_ARRAY_TASK_COUNT``, else torchrun's
    ``WORLD_SIZE``, else 1."""

    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``: where model features are computed."""

    batch_samples: int = 1_600_000
    """Model features: utterances are batched up to this many padded samples (100 s)."""

    def validate(self) -> None:
        if self.jobs < 0:
            raise ConfigError(f"must be >= 0, got {self.jobs}", field="jobs")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"must be auto, cpu or cuda, got '{self.device}'", field="device")
        if self.num_tasks is not None and self.num_tasks < 1:
            raise ConfigError(f"must be >= 1, got {self.num_tasks}", field="num_tasks")
        if self.task is not None and self.num_tasks is not None and not 0 <= self.task < self.num_tasks:
            raise ConfigError(f"must be in [0, num_tasks={self.num_tasks}), got {self.task}", field="task")
        if self.batch_samples < 16000:
            raise ConfigError(f"must be >= 16000 (one second), got {self.batch_samples}", field="batch_samples")


@dataclass
class FeaturesMfccConfig(ParallelConfig):
    shards: str = MISSING
    """Shard directory (made by ``pretrain shards build``)."""

    out: str = MISSING
    """Output folder of the sampled features: one ``<shard>.npy`` (frames x dim) and
    ``<shard>.json`` (keys and frames per key) per shard, ``meta.json`` once all are done.
    Rerunning skips shards whose files are complete."""

    fraction: float = 0.1
    """Fraction of utterances sampled; an utterance is in the sample when a hash of
    ``(seed, key)`` falls below it, so the choice does not depend on the task split."""

    max_frames: Optional[int] = 5_000_000
    """At most this many frames in all (null: no bound). Each shard gets a share proportional
    to its duration; a shard over its share keeps a seeded random subset of frames. This bounds
    the memory of ``kmeans fit`` (5M x 768 float32 frames = 15 GB; 5M x 39 = 0.8 GB)."""

    seed: int = 0
    """Seed of the sample."""

    dtype: str = "float32"
    """Stored precision: ``float32`` or ``float16`` (half the disk; k-means reads float32)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.fraction}", field="fraction")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"must be >= 1 or null, got {self.max_frames}", field="max_frames")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"must be float32 or float16, got '{self.dtype}'", field="dtype")


@dataclass
class FeaturesModelConfig(FeaturesMfccConfig):
    checkpoint: str = MISSING
    """A model file (model.pt) or a checkpoint folder holding one, from ``pretrain train``."""

    layer: int = 6
    """Transformer layer whose output is the feature (1-based; the paper uses 6 for BASE's
    second iteration, 9 for its third)."""

    layer_from: Optional[str] = None
    """A ``probe.json`` of this checkpoint (``pretrain probe``): cluster the layer that scored
    best there on ``layer_metric`` instead of ``layer`` (what ``layer: auto`` in ``pretrain
    iterate`` sets)."""

    layer_metric: str = "phone_acc"
    """The probe metric that picks the layer with ``layer_from``: ``phone_acc``, ``per``,
    ``abx_within``, ``abx_across``, ``speaker_acc`` or ``pnmi`` (lower wins for ABX and PER)."""

    chunk_seconds: float = 30.0
    """Utterances longer than this plus twice ``chunk_context`` are run in windows (bounded
    memory for long recordings); recorded in the feature spec, so label assignment windows the
    same way."""

    chunk_context: float = 5.0
    """Seconds each window sees on either side of the frames it contributes."""

    def validate(self) -> None:
        super().validate()
        if self.layer < 1:
            raise ConfigError(f"must be >= 1, got {self.layer}", field="layer")
        if self.chunk_seconds < 1.0:
            raise ConfigError(f"must be >= 1 second, got {self.chunk_seconds}", field="chunk_seconds")
        if self.chunk_context < 0:
            raise ConfigError(f"must be >= 0, got {self.chunk_context}", field="chunk_context")
        metrics = ("phone_acc", "per", "abx_within", "abx_across", "speaker_acc", "pnmi")
        if self.layer_metric not in metrics:
            raise ConfigError(f"must be one of {', '.join(metrics)}, got '{self.layer_metric}'", field="layer_metric")


@dataclass
class KmeansFitConfig:
    features: str = MISSING
    """Folder written by ``pretrain features mfcc|model``."""

    out: str = MISSING
    """Output folder: ``centroids.npy``, ``kmeans.json`` (provenance) and
    ``objective.png``."""

    k: int = 100
    """Number of clusters (the paper: 100 for MFCC, 500 for later iterations)."""

    niter: int = 5
    """Lloyd iterations on every point, after the coarse fit."""

    coarse_points: Optional[int] = 50000
    """Size of the seeded subsample of the coarse fit (k-means++ seeding, then ``coarse_niter``
    Lloyd iterations), used when the sample is larger; null fits on every point from the
    seeding on. On 200k points the coarse fit plus 5 iterations reached a lower inertia than 20
    iterations on every point in about half the time."""

    coarse_niter: int = 20
    """Lloyd iterations of the coarse fit."""

    nredo: int = 1
    """Restarts; the one with the lowest objective is kept."""

    init: str = "kmeans++"
    """``kmeans++`` (FAISS's, on ``init_points_per_centroid * k`` points) or ``random``
    (FAISS's default)."""

    init_points_per_centroid: int = 40
    """Size of the k-means++ seeding subsample, per centroid."""

    max_points_per_centroid: Optional[int] = None
    """FAISS subsamples the training set to this many points per centroid (null: use every
    point of the sample)."""

    seed: int = 0
    """Seed of the initialization and any subsampling."""

    device: str = "auto"
    """``auto`` (the GPU when FAISS sees one), ``gpu`` or ``cpu``."""

    def validate(self) -> None:
        for name in ("k", "niter", "nredo", "init_points_per_centroid", "coarse_niter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.init not in ("kmeans++", "random"):
            raise ConfigError(f"must be kmeans++ or random, got '{self.init}'", field="init")
        if self.device not in ("auto", "gpu", "cpu"):
            raise ConfigError(f"must be auto, gpu or cpu, got '{self.device}'", field="device")
        if self.coarse_points is not None and self.coarse_points <= self.k:
            raise ConfigError(f"must be larger than k={self.k} or null, got {self.coarse_points}",
                              field="coarse_points")
        if self.max_points_per_centroid is not None and self.max_points_per_centroid < 1:
            raise ConfigError("must be >= 1 or null", field="max_points_per_centroid")


@dataclass
class KmeansAssignConfig(ParallelConfig):
    kmeans: str = MISSING
    """Folder written by ``pretrain kmeans fit``; its provenance says which features to
    compute (MFCC, or a checkpoint's layer, whose sha256 is checked)."""

    shards: str = MISSING
    """Shard directory whose every utterance gets labels."""

    name: str = MISSING
    """Name of the label set written under ``<shards>/labels/<name>/`` (one path component:
    letters, digits, ``._-``)."""

    checkpoint: Optional[str] = None
    """Where the model the k-means' features came from is now, if it moved (a moved run
    directory); its sha256 must equal the recorded one. Default: the recorded path."""

    overwrite: bool = False
    """Replace a label set of this name that was not made from these centroids (someone's
    alignments, gold labels or another k-means; refused otherwise). One made from these
    centroids is resumed, never redone."""

    def validate(self) -> None:
        super().validate()
        check_name(self.name, "name")


@dataclass
class KmeansQualityConfig:
    shards: str = MISSING
    """Shard directory holding both label sets."""

    labels: Optional[str] = None
    """The cluster label set to judge (a label set stored in ``shards``)."""

    kmeans: Optional[str] = None
    """Instead of ``labels``: a ``kmeans fit`` folder whose labels are computed for these
    shards in memory (features as it was fitted on, nothing written into the shards). This is
    the held-out check: k-means fitted on training shards, scored on evaluation shards. A
    100 Hz k-means scored against a 50 Hz reference uses every second frame (frame ``2i`` has
    the centre of 50 Hz frame ``i``)."""

    reference: str = "phones100"
    """The reference label set (phone alignments) at the same label rate: the synthetic
    corpus gives ``phones100`` and ``phones50``."""

    out: str = MISSING
    """Report folder: ``quality.json``, ``cooccurrence.png``, ``usage.png``."""

    checkpoint: Optional[str] = None
    """With ``kmeans``: where the model its features came from is now, if it moved; its sha256
    must equal the recorded one. Default: the recorded path."""

    def validate(self) -> None:
        for name in ("labels", "reference"):
            if getattr(self, name) is not None:
                check_name(getattr(self, name), name)
        if (self.labels is None) == (self.kmeans is None):
            raise ConfigError("set exactly one of 'labels' and 'kmeans'", field="labels")
