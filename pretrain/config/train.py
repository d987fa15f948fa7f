"""Configuration of ``pretrain train``: model, data, optimization, DeepSpeed, checkpoints, logs.

Defaults are HuBERT BASE's recipe (../shared/notes/hubert-recipe.md); a run's YAML lists only
what differs. ``run_dir`` is where everything of a run lives; relaunching the same command
there resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError
from pretrain.config.data import DataConfig
from pretrain.config.model import ModelConfig
from pretrain.config.probe import TrainProbeConfig


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate (BASE 5e-4, LARGE 1.5e-3)."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas."""

    eps: float = 1e-6
    """Adam epsilon."""

    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""

    warmup_steps: int = 32000
    """Linear warmup from 0 to ``lr`` over these steps (8 % of 400k)."""

    max_steps: int = 400000
    """Total optimizer steps; the LR decays to ``end_lr`` at this step."""

    decay: str = "linear"
    """Decay after warmup: ``linear`` or ``polynomial`` (with ``power``)."""

    power: float = 1.0
    """Exponent of the polynomial decay (1.0 is linear)."""

    end_lr: float = 0.0
    """Learning rate reached at ``max_steps``."""

    clip_grad: float = 10.0
    """Gradient norm clipping (BASE 10, LARGE 1); 0 disables it."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"must be > 0, got {self.lr}", field="lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"must be two numbers in [0, 1), got {list(self.betas)}", field="betas")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}",
                              field="warmup_steps")
        if self.max_steps < 1:
            raise ConfigError(f"must be >= 1, got {self.max_steps}", field="max_steps")
        if self.decay not in ("linear", "polynomial"):
            raise ConfigError(f"must be 'linear' or 'polynomial', got '{self.decay}'", field="decay")
        if self.end_lr < 0 or self.end_lr > self.lr:
            raise ConfigError(f"must be in [0, lr], got {self.end_lr}", field="end_lr")
        if self.clip_grad < 0:
            raise ConfigError(f"must be >= 0, got {self.clip_grad}", field="clip_grad")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0-3."""

    precision: str = "bf16"
    """``bf16``, ``fp16`` (with DeepSpeed's dynamic loss scaling) or ``fp32``."""

    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"must be 0, 1, 2 or 3, got {self.zero_stage}", field="zero_stage")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"must be bf16, fp16 or fp32, got '{self.precision}'", field="precision")
        if self.grad_accum < 1:
            raise ConfigError(f"must be >= 1, got {self.grad_accum}", field="grad_accum")


@dataclass
class CheckpointConfig:
    every: int = 5000
    """Save every this many optimizer steps (and at the end)."""

    keep_last: int = 2
    """Complete checkpoints kept (at least 2, so a damaged newest one has a fallback)."""

    pin: list[int] = field(default_factory=list)
    """Steps whose checkpoints are never deleted."""

    start_over: bool = False
    """When ``run_dir`` holds checkpoints but none passes verification (all quarantined as
    ``step_N.bad``), train from step 0 anyway. Off: such a start is refused, since it would
    silently discard the run's progress."""

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"must be >= 1, got {self.every}", field="every")
        if self.keep_last < 2:
            raise ConfigError(f"must be >= 2, got {self.keep_last}", field="keep_last")


@dataclass
class LogConfig:
    every: int = 100
    """Log metrics every this many optimizer steps."""

    wandb: str = "auto"
    """``online``, ``offline``, ``disabled``, or ``auto`` (online when logged in, else offline)."""

    wandb_project: str = "pretrain"
    """wandb project name."""

    wandb_group: Optional[str] = None
    """wandb group: ``pretrain iterate`` puts every training of a run in one (the run's name
    and a hash of its path). Unset: no group."""

    wandb_name: Optional[str] = None
    """wandb run name (``it<i>.train`` under ``pretrain iterate``). Unset: the run folder's name."""

    wandb_tags: list[str] = field(default_factory=list)
    """wandb tags (``pretrain iterate``: the objective, the iteration, k, the features)."""

    wandb_job_type: str = "train"
    """wandb job type."""

    wandb_artifacts: bool = False
    """Also log files to wandb as artifacts: the final checkpoint's ``model.pt``, manifest and
    config (type ``model``, named ``model-<wandb run id>``, aliases ``latest`` and ``step_N``)
    when training reaches ``optim.max_steps``, and under ``pretrain iterate`` each iteration's
    k-means centroids (type ``kmeans``) into its training's run. Off by default: they are
    big (a BASE ``model.pt`` is about 380 MB) and wandb uploads them."""

    tensorboard: bool = True
    """Write TensorBoard scalars to ``run_dir/tensorboard``."""

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"must be >= 1, got {self.every}", field="every")
        if self.wandb not in ("online", "offline", "disabled", "auto"):
            raise ConfigError(f"must be online, offline, disabled or auto, got '{self.wandb}'", field="wandb")


@dataclass
class TrainConfig:
    run_dir: str = MISSING
    """Directory of the run: config, checkpoints, metrics. Relaunching resumes from it."""

    seed: int = 1
    """Seed of initialization, masking and dropout (the data order has its own, data.seed)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network and its objective."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data: shards and label sets."""

    max_requeues: int = 20
    """Under SLURM, how many times a run preempted (SIGUSR1, e.g. ``--signal=USR1@180`` before
    the time limit, or ``scancel --signal=USR1``) checkpoints and requeues itself. When
    ``SLURM_RESTART_COUNT`` has reached it, the run checkpoints and stops with exit status 1
    (job FAILED) and a message saying so, instead of requeueing forever."""

    valid_shards: Optional[str] = None
    """Held-out shard directory (same label sets) for periodic validation; none: no validation."""

    valid_every: int = 10000
    """Validate every this many optimizer steps."""

    valid_batches: int = 50
    """Batches per rank in a validation pass."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    log: LogConfig = field(default_factory=LogConfig)
    """Metrics and dashboards."""

    probe: TrainProbeConfig = field(default_factory=TrainProbeConfig)
    """Probes (ABX, phone, speaker) of saved checkpoints while training runs."""

    init_from: Optional[str] = None
    """A model file or checkpoint folder whose backbone (front end, Transformer, mask
    embedding) a new run starts from; the label embeddings and ``final_proj`` start fresh,
    since they belong to the old label set (the choice of HuBERT's continued iterations in
    later work, and what continued pretraining needs). The backbone's shape fields of
    ``model`` must match the file's. Read only when the run has no checkpoint: a resumed run
    continues from its own."""

    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""

    stall_timeout: float = 1800.0
    """Seconds without a completed training step (checkpoint saves and validation included)
    after which every rank writes its Python stacks to ``run_dir/stacks/`` and the job stops
    with an error: a wedged rank, file system or data source must not hold a cluster's GPUs
    forever. 0 turns the watchdog off."""

    startup_timeout: float = 3600.0
    """The same limit until the first step completes (process group, checkpoint loading,
    ``model.compile``, the first batches take longer than a step). 0: no limit."""

    collective_timeout: float = 1800.0
    """Seconds a collective operation (all-reduce, barrier) may wait for the other ranks before
    it fails, so that a rank that died without its launcher noticing cannot hold the others
    forever. Ranks wait in one while rank 0 saves a checkpoint: keep it above the save time."""

    def validate(self) -> None:
        if self.model.objective == "wav2vec2":
            if self.data.labels:
                raise ConfigError("wav2vec 2.0 learns its own quantized targets, not labels: set data.labels=[]",
                                  field="data.labels")
            if self.valid_shards:
                raise ConfigError("validation losses are HuBERT's; for wav2vec 2.0 leave valid_shards unset and "
                                  "use the probes (probe.every)", field="valid_shards")
        elif self.model.objective == "data2vec":
            if self.data.labels:
                raise ConfigError("data2vec learns from its EMA teacher, not from labels: set data.labels=[]",
                                  field="data.labels")
            if self.deepspeed.zero_stage == 3:
                # ZeRO 3 partitions the student's weights over the ranks; the teacher's update
                # would have to gather them every step.
                raise ConfigError("data2vec's EMA teacher needs the whole student on every rank: use ZeRO 0, 1 "
                                  "or 2", field="deepspeed.zero_stage")
            if self.valid_shards:
                raise ConfigError("validation losses are HuBERT's; for data2vec leave valid_shards unset and "
                                  "use the probes (probe.every)", field="valid_shards")
        elif not self.data.labels:
            raise ConfigError("training needs at least one label set", field="data.labels")
        if self.max_bad_steps < 1:
            raise ConfigError(f"must be >= 1, got {self.max_bad_steps}", field="max_bad_steps")
        for name in ("stall_timeout", "startup_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0 (0 turns it off), got {getattr(self, name)}", field=name)
        if self.collective_timeout <= 0:
            raise ConfigError(f"must be > 0, got {self.collective_timeout}", field="collective_timeout")
        if self.max_requeues < 0:
            raise ConfigError(f"must be >= 0, got {self.max_requeues}", field="max_requeues")
        if self.valid_every < 1 or self.valid_batches < 1:
            raise ConfigError("must be >= 1", field="valid_every")
