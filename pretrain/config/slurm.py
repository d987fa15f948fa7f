"""A cluster profile for ``launch slurm``: what differs between SLURM clusters, kept out of the
sbatch templates (``slurm/*.sbatch``). Profiles live in ``configs/cluster/``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from pretrain.config.core import ConfigError


@dataclass
class SlurmProfile:
    partition: Optional[str] = None
    """``--partition``; unset: the cluster's default partition."""

    account: Optional[str] = None
    """``--account`` to charge."""

    qos: Optional[str] = None
    """``--qos``."""

    constraint: Optional[str] = None
    """``--constraint`` (node features, e.g. ``a100|h100``)."""

    nodes: int = 1
    """Nodes of a training job."""

    gpus_per_node: int = 0
    """GPUs per node of a training job (``--gpus-per-node``; 0 for CPU-only clusters)."""

    tasks_per_node: Optional[int] = None
    """Training processes per node; unset: one per GPU (``gpus_per_node``, or 1 without GPUs)."""

    cpus_per_task: int = 4
    """CPUs per training process (data workers run in them)."""

    mem: Optional[str] = None
    """Memory per node (``--mem``, e.g. ``200G``); unset: the cluster's default."""

    time: str = "24:00:00"
    """Time limit of each job (``--time``) in SLURM's formats (``HH:MM:SS``, ``MM:SS``,
    ``D-HH:MM:SS``); a bare number is refused, since SLURM reads it as minutes. A preempted or
    timed-out training job requeues itself and resumes."""

    signal_seconds: int = 180
    """Lead time of the preemption signal before the time limit (``--signal=USR1@N``): enough
    to finish a step and write a checkpoint."""

    offline_gpus: int = 0
    """GPUs for each task of the offline stages (features, k-means)."""

    offline_cpus: int = 8
    """CPUs for each task of the offline stages."""

    offline_mem: Optional[str] = None
    """Memory for each task of the offline stages."""

    offline_time: str = "4:00:00"
    """Time limit of each offline task (they requeue on the signal too, redoing only unfinished
    shards)."""

    array_tasks: int = 4
    """Tasks of an array job over shards (features, label assignment)."""

    array_parallel: Optional[int] = None
    """At most this many array tasks run at once (``--array=0-N%P``); unset: no limit."""

    max_requeues: int = 20
    """Offline jobs requeue themselves on the preemption signal at most this often (training
    has its own ``max_requeues`` in its config)."""

    extra_sbatch: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options, one per entry, written as given (e.g. ``--exclusive``,
    ``--reservation=r1``)."""

    setup: list[str] = field(default_factory=list)
    """Shell lines run before the stage, e.g. ``module load cuda/12.4``,
    ``source /shared/venvs/pretrain/bin/activate``, ``export NCCL_DEBUG=WARN``."""

    python: Optional[str] = None
    """Python of the environment pretrain is installed in, on the compute nodes; unset: the
    one running ``launch`` (right when it lives on a shared file system)."""

    def validate(self) -> None:
        for name in ("nodes", "cpus_per_task", "offline_cpus", "array_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("gpus_per_node", "offline_gpus", "max_requeues"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", field=name)
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ConfigError(f"must be >= 1, got {self.tasks_per_node}", field="tasks_per_node")
        if self.array_parallel is not None and self.array_parallel < 1:
            raise ConfigError(f"must be >= 1, got {self.array_parallel}", field="array_parallel")
        if self.signal_seconds < 10:
            raise ConfigError(f"must be >= 10 (time to checkpoint), got {self.signal_seconds}",
                              field="signal_seconds")
        for name in ("time", "offline_time"):
            value = getattr(self, name)
            if re.fullmatch(r"\d+", value):
                raise ConfigError(f"'{value}' is a bare number, which SLURM reads as minutes (and YAML 1.1 "
                                  "tools make of an unquoted 24:00:00 the number 86400); write the limit as "
                                  "HH:MM:SS, MM:SS or D-HH:MM:SS", field=name)
            if not re.fullmatch(r"\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+(:\d{2}){0,2}", value):
                raise ConfigError(f"'{value}' is not a SLURM time limit (MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                                  "D-HH:MM:SS)", field=name)
        for i, line in enumerate(self.extra_sbatch):
            if not line.startswith("--"):
                raise ConfigError(f"entry {i} '{line}' must be an sbatch option starting with --",
                                  field="extra_sbatch")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)
