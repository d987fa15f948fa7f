"""Configuration of ``pretrain iterate``: the whole iterative HuBERT pipeline in one run
directory. Defaults follow the paper (iteration 1: MFCC, k=100; iteration 2: layer 6 of
iteration 1's model, k=500); ``configs/demo.yaml`` is the CPU-sized demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError
from pretrain.config.corpus import ALL_VOICES


@dataclass
class IterCorpusConfig:
    synth_hours: Optional[float] = None
    """Synthesize a speech corpus of this many hours into ``run_dir/corpus`` (the demo); unset:
    use ``input`` or ``shards``."""

    synth_seed: int = 0
    """Seed of the synthesized corpus."""

    synth_max_clauses: int = 3
    """Sentence length of the synthesized corpus (1 .. this many clauses)."""

    synth_voices: Optional[list[str]] = None
    """Voices of the synthesized corpus (``pretrain corpus synth``'s ``voices``); unset: all."""

    synth_stretch: float = 1.0
    """Speaking-rate factor of the synthesized corpus (``pretrain corpus synth``'s ``stretch``)."""

    input: Optional[str] = None
    """A corpus to shard into ``run_dir/shards`` (folder, TSV or JSONL manifest)."""

    shards: Optional[str] = None
    """Existing shards to use as they are (no corpus stage, no shard stage). Label sets are
    added to them (``labels/it<i>_km<k>``)."""

    per_shard: int = 32
    """Utterances per shard when sharding."""

    shards_overrides: list[str] = field(default_factory=list)
    """More ``key=value`` options of the ``pretrain shards build`` stage, any of its fields but
    ``input``, ``out``, ``per_shard`` and ``jobs`` (set above): ``speaker_from``,
    ``max_duration`` / ``long_policy`` for long files, ``subset`` / ``valid_fraction`` /
    ``split_by`` for a held-out split, ``audio_format``, ``min_duration``, ...; checked, and
    an unknown one refused by name, before anything runs."""

    def validate(self) -> None:
        given = [name for name in ("synth_hours", "input", "shards") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"set exactly one of synth_hours, input and shards (got {given or 'none'})",
                              field="synth_hours")
        if self.synth_hours is not None and not self.synth_hours > 0:
            raise ConfigError(f"must be > 0, got {self.synth_hours}", field="synth_hours")
        if self.per_shard < 1:
            raise ConfigError(f"must be >= 1, got {self.per_shard}", field="per_shard")


@dataclass
class IterationConfig:
    features: str = "mfcc"
    """``mfcc`` (39-dim MFCC, 100 Hz labels), or ``model``: layer ``layer`` of the previous
    iteration's final model (50 Hz labels)."""

    layer: str = "6"
    """Transformer layer (1-based) whose hidden states are clustered (``features: model``), or
    ``auto``: the layer of the previous iteration's model that scored best on ``probe_metric``
    in its probes (needs ``eval``)."""

    k: int = 100
    """Clusters."""

    fraction: float = 0.1
    """Fraction of utterances sampled for k-means."""

    max_frames: int = 5_000_000
    """Bound on the k-means sample."""

    kmeans_seed: int = 0
    """Seed of the k-means fit."""

    max_steps: int = 250_000
    """Training updates of this iteration (paper: 250k for iteration 1, 400k for 2)."""

    train_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of this iteration's training config, after ``train_overrides``
    of the run."""

    init_from_previous: bool = False
    """Start this iteration's training from the previous iteration's final backbone (train
    ``init_from``; new label embeddings and projection) instead of from scratch, as the
    paper does. Continuing pays when training is short (the demo); at the paper's budget each
    iteration starts from scratch."""

    def validate(self) -> None:
        if self.features not in ("mfcc", "model"):
            raise ConfigError(f"must be 'mfcc' or 'model', got '{self.features}'", field="features")
        if self.layer != "auto" and not (self.layer.isdigit() and int(self.layer) >= 1):
            raise ConfigError(f"must be a layer number >= 1 or 'auto', got '{self.layer}'", field="layer")
        for name in ("k", "max_frames", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.fraction}", field="fraction")


def _paper_iterations() -> list[IterationConfig]:
    return [IterationConfig(features="mfcc", k=100, max_steps=250_000),
            IterationConfig(features="model", layer="6", k=500, max_steps=400_000)]


@dataclass
class IterEvalConfig:
    synth_hours: Optional[float] = None
    """Synthesize a held-out evaluation corpus of this many hours into ``run_dir/eval`` (other
    sentences: the corpus seed plus ``synth_seed_offset``); unset: ``shards`` or no probes."""

    synth_seed_offset: int = 1000
    """The evaluation corpus's seed is the training corpus's plus this."""

    synth_voices: Optional[list[str]] = None
    """Voices of the evaluation corpus; unset: every voice, so voices left out of
    ``corpus.synth_voices`` are speakers the model never heard."""

    input: Optional[str] = None
    """A held-out corpus (folder, TSV or JSONL manifest: other speakers or other sentences, e.g.
    LibriSpeech dev-clean) to shard into ``run_dir/eval/shards``, with ``shards_overrides``."""

    shards: Optional[str] = None
    """Existing evaluation shards (with ``phones50``/``phones100`` and speakers) instead."""

    shards_overrides: list[str] = field(default_factory=list)
    """``key=value`` options of the evaluation shards' ``pretrain shards build`` (``input``: see
    ``corpus.shards_overrides``)."""

    probes: str = "abx,phone,speaker,pnmi"
    """Probes run after each iteration's training (``pretrain probe``)."""

    probe_overrides: list[str] = field(default_factory=list)
    """More ``key=value`` settings of every ``pretrain probe`` stage."""

    probe_metric: str = "phone_acc"
    """The probe metric whose best layer ``layer: auto`` clusters in the next iteration:
    ``phone_acc`` (default: the frame phone probe, the closest to what k-means labels should
    capture), ``per``, ``abx_within``, ``abx_across``, ``pnmi`` or ``speaker_acc``."""

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.synth_hours, self.input, self.shards))

    def validate(self) -> None:
        given = [name for name in ("synth_hours", "input", "shards") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"set at most one of synth_hours, input and shards (got {', '.join(given)})",
                              field=given[1])
        if self.synth_hours is not None and not self.synth_hours > 0:
            raise ConfigError(f"must be > 0, got {self.synth_hours}", field="synth_hours")
        metrics = ("phone_acc", "per", "abx_within", "abx_across", "speaker_acc", "pnmi")
        if self.probe_metric not in metrics:
            raise ConfigError(f"must be one of {', '.join(metrics)}, got '{self.probe_metric}'",
                              field="probe_metric")


@dataclass
class IterateConfig:
    run_dir: str = MISSING
    """Every stage writes under this directory; rerunning the command in it skips finished
    stages and resumes an interrupted one."""

    corpus: IterCorpusConfig = field(default_factory=IterCorpusConfig)
    """Where the audio comes from."""

    iterations: list[IterationConfig] = field(default_factory=_paper_iterations)
    """One entry per iteration; iteration 1 must cluster MFCC, later ones a model's layer."""

    eval: IterEvalConfig = field(default_factory=IterEvalConfig)
    """Held-out evaluation shards: when set, ``pretrain probe`` runs after every iteration's
    training (ABX, phone, speaker, PNMI per layer; iteration 1 with the MFCC, log-mel and
    untrained baselines) and ``report.md`` gets the probe table."""

    train_configs: list[str] = field(default_factory=lambda: ["configs/model/base.yaml"])
    """YAML files of the training config (model size, optimizer, ...), relative to the current
    directory; ``run_dir``, ``data.shards``, ``data.labels`` and ``optim.max_steps`` are set
    per iteration."""

    train_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of every iteration's training config."""

    nproc: int = 1
    """Training processes on this machine (one per GPU); under SLURM the profile decides."""

    jobs: int = 0
    """Worker processes of the offline stages on this machine (0: every core)."""

    reference: Optional[str] = "auto"
    """Phone label sets for the label-quality report: ``auto`` uses ``phones100`` /
    ``phones50`` when the shards have them (synthetic corpora), ``null`` skips the report's
    quality part."""

    reference_curves: Optional[str] = None
    """A reference run in ``pretrain/reference_curves.json`` (``demo``,
    ``small_cpu``) whose loss and masked-accuracy curves the report draws faintly behind this
    run's, to tell a normal run from a broken one; unset: none."""

    export: bool = True
    """Export the last iteration's model to ``run_dir/hf`` (transformers)."""

    only: Optional[str] = None
    """Run just this stage (``it2.train``, ...) in this process and stop; SLURM jobs of
    ``launch slurm iterate`` use it. Unset: every stage that is not done."""

    dry_run: bool = False
    """Print the plan and exit: every stage, and whether it is done, would run, or would rerun
    and why (the config fields that changed, or the upstream stage that reruns). Nothing is
    run, written or deleted."""

    def validate(self) -> None:
        if not self.iterations:
            raise ConfigError("needs at least one iteration", field="iterations")
        if self.iterations[0].features != "mfcc":
            raise ConfigError("iteration 1 has no previous model: its features must be 'mfcc'",
                              field="iterations.0.features")
        if self.nproc < 1:
            raise ConfigError(f"must be >= 1, got {self.nproc}", field="nproc")
        if self.jobs < 0:
            raise ConfigError(f"must be >= 0, got {self.jobs}", field="jobs")
        if self.iterations[0].init_from_previous:
            raise ConfigError("iteration 1 has no previous model to start from", field="iterations.0.init_from_previous")
        for i, it in enumerate(self.iterations):
            if it.features == "model" and it.layer == "auto" and not self.eval.enabled:
                raise ConfigError("layer 'auto' picks the layer by the previous iteration's probes: set "
                                  "eval.synth_hours, eval.input or eval.shards", field=f"iterations.{i}.layer")
        if self.eval.synth_hours is not None and self.corpus.synth_hours is None:
            raise ConfigError("eval.synth_hours needs a synthesized training corpus (corpus.synth_hours) to "
                              "take the voices and seed from; give eval.input or eval.shards instead", field="eval.synth_hours")
        if self.eval.synth_hours is not None and self.eval.probes:
            self._check_eval_size()

    def _check_eval_size(self) -> None:
        """Refuse, before anything runs, an evaluation corpus too small for the probes' split:
        within each voice probe-train, probe-dev and probe-test each get an utterance only from
        3 utterances on (``pretrain.probe.data.split_counts``), so with about 2 per voice or
        fewer probe-dev is empty, which the probes would find only after training."""
        voices = len(self.eval.synth_voices or ALL_VOICES)
        # Measured: the demo's 1-hour corpus (max_clauses 3) holds 516 utterances, 7.0 s each on
        # average; a clause is about half of that.
        seconds = 3.5 * (1 + self.corpus.synth_max_clauses) / 2 * self.corpus.synth_stretch
        per_voice = self.eval.synth_hours * 3600 / seconds / voices
        if per_voice < 2:
            need = 3 * seconds * voices / 3600
            raise ConfigError(f"{self.eval.synth_hours} h gives about {per_voice:.1f} utterances per voice ({voices} "
                              f"voices, about {seconds:.1f} s each), and the probes' train/dev/test split needs 3 per "
                              f"voice: set at least {need:.2f}", field="eval.synth_hours")
