"""Configuration of ``pretrain probe``: frozen-feature probes (ABX, phone, speaker, PNMI, kNN-VC)
of a model's layers on held-out evaluation shards, next to the MFCC, log-mel and untrained
baselines, and of ``pretrain knnvc``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError

PROBES = ("abx", "phone", "speaker", "pnmi", "knnvc")
BASELINES = ("mfcc", "logmel", "untrained")
METRICS = {  # name: (label, higher is better)
    "abx_within": ("ABX within (%)", False),
    "abx_across": ("ABX across (%)", False),
    "phone_acc": ("phone acc (%)", True),
    "per": ("PER (%)", False),
    "speaker_acc": ("speaker acc (%)", True),
    "pnmi": ("PNMI", True),
    "knnvc_content": ("kNN-VC same phone (%)", True),
    "knnvc_phone_acc": ("kNN-VC phone acc (%)", True),
    "knnvc_target": ("kNN-VC → target (%)", True),
    "knnvc_source": ("kNN-VC → source (%)", False),
    "knnvc_target_audio": ("kNN-VC audio → target (%)", True),
    "knnvc_source_audio": ("kNN-VC audio → source (%)", False),
    "knnvc_smooth": ("kNN-VC consecutive (%)", True),
}
PROBE_METRICS = {"abx": ("abx_within", "abx_across"), "phone": ("phone_acc", "per"),
                 "speaker": ("speaker_acc",), "pnmi": ("pnmi",),
                 "knnvc": ("knnvc_content", "knnvc_phone_acc", "knnvc_target", "knnvc_source",
                           "knnvc_target_audio", "knnvc_source_audio", "knnvc_smooth")}
"""Each probe's metrics, as named in ``probe.json``, the tables and the report."""


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"must be auto, cpu or cuda, got '{device}'", field="device")


def check_window(window: int) -> None:
    """kNN-VC's overlap-add window: whole hops' worth of Hann, centred on a frame."""
    if window < 320 or window % 2:
        raise ConfigError(f"must be even and at least one hop (320 samples), got {window}", field="window")

def parse_list(value: str, allowed: tuple[str, ...], field_name: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; ``"all"`` -> every allowed name; ``"none"`` or empty -> []."""
    value = value.strip()
    if value == "all":
        return list(allowed)
    if value in ("", "none"):
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in allowed:
            raise ConfigError(f"unknown entry '{name}'; choose from {', '.join(allowed)}, all or none",
                              field=field_name)
    return names


def parse_layers(value: str) -> list[int] | None:
    """``all`` -> None (every layer); ``"1,3,5"`` -> [1, 3, 5]."""
    value = str(value).strip()
    if value == "all":
        return None
    try:
        layers = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"must be 'all' or comma-separated layer numbers, got '{value}'", field="layers") from None
    if not layers or layers[0] < 1:
        raise ConfigError(f"layers are 1-based Transformer layers, got '{value}'", field="layers")
    return layers


@dataclass
class AbxConfig:
    max_per_group: int = 5
    """At most this many items per (context, speaker, centre phone), a seeded choice: bounds the
    number of DTW pairs so that a layer takes seconds."""

    min_triplets: int = 100
    """Fewer scorable (A, B, X) triplets than this is an error (the score would be noise)."""

    seed: int = 0
    """Seed of the item subsample."""

    item_file: Optional[str] = None
    """A Libri-light ``.item`` file (``#file onset offset #phone prev-phone next-phone speaker``,
    e.g. its ``dev-clean.item``): ABX then scores its items, not triphones of the phone
    reference, with its phones and speakers; its file IDs name the utterances whose keys are
    them or end in ``/<ID>``. With LibriSpeech dev-clean in the evaluation shards this is the
    number papers report (Libri-light's ``eval_ABX``, ``feature_size`` 0.02), up to the
    subsampling ``max_per_group`` sets (docs/probes.md)."""

    def validate(self) -> None:
        if self.item_file is not None and not Path(self.item_file).is_file():
            raise ConfigError(f"no such file: {self.item_file}", field="item_file")
        if self.max_per_group < 2:
            raise ConfigError(f"must be >= 2 (A and X are two items), got {self.max_per_group}",
                              field="max_per_group")
        if self.min_triplets < 1:
            raise ConfigError(f"must be >= 1, got {self.min_triplets}", field="min_triplets")


@dataclass
class KnnvcConfig:
    k: int = 4
    """Reference frames averaged per source frame (cosine nearest; the paper's k = 4)."""

    window: int = 640
    """Overlap-add window of the audio, in samples (Hann): 640 is two 20 ms hops, 50 %
    overlap (docs/probes.md has the windows measured against each other)."""

    max_pairs: int = 8
    """Ordered (source, target) speaker pairs of the evaluation set to convert, a seeded
    choice among all pairs; sources are the source speaker's probe-test utterances, the
    reference the target speaker's probe-train and probe-dev ones."""

    seed: int = 0
    """Seed of the pair choice."""

    audio: bool = True
    """Also write the converted audio (in memory) and encode it again, for the speaker probe's
    decision on what a listener would hear; the costliest part (a forward per layer)."""

    device: str = "auto"
    """Where FAISS matches: ``auto`` (a GPU when FAISS sees one), ``cpu`` or ``cuda``."""

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"must be >= 1, got {self.k}", field="k")
        check_window(self.window)
        if self.max_pairs < 1:
            raise ConfigError(f"must be >= 1, got {self.max_pairs}", field="max_pairs")
        check_device(self.device)


@dataclass
class LinearProbeConfig:
    lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-2, 1e-1])
    """Learning rates tried (Adam); the one with the best probe-dev score is reported on
    probe-test. SUPERB's results swing by 10+ points with this choice, so it is swept."""

    epochs: int = 20
    """Passes over probe-train per learning rate."""

    ctc_epochs: int = 4
    """Passes of the CTC head over probe-train. The head starts from the frame classifier that
    probe-dev chose (plus a blank class) and trains at its learning rate, so a few passes teach
    it CTC's blank; from scratch it would need several times more (CTC is the probe suite's
    costliest part on a CPU)."""

    batch: int = 4096
    """Frames (frame probe) or utterances x 64 (CTC, speaker) per update."""

    seed: int = 0
    """Seed of the probe's initialization and batch order."""

    def validate(self) -> None:
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ConfigError(f"needs at least one learning rate, all > 0, got {self.lrs}", field="lrs")
        if self.epochs < 1 or self.batch < 1 or self.ctc_epochs < 0:
            raise ConfigError("epochs and batch must be >= 1", field="epochs")


@dataclass
class ProbeConfig:
    checkpoint: Optional[str] = None
    """The model: a ``model.pt``, a training checkpoint folder (``.../checkpoints/step_N``, whose
    manifest sha256 is checked), or a ``transformers`` HubertModel / WavLMModel folder (our
    ``export hf`` output). Unset: only the baselines are probed."""

    checkpoint_sha256: Optional[str] = None
    """Expected sha256 of the model file; a mismatch is an error (training's probes set it from
    the checkpoint manifest)."""

    eval_shards: str = MISSING
    """Held-out evaluation shards (``pretrain shards build``) with phone label sets
    (``phones50``/``phones100``) and a ``speaker`` per utterance in the shard metadata."""

    out: str = MISSING
    """Output folder: ``probe.json``, ``probe.md``, ``probe.png``."""

    layers: str = "all"
    """Transformer layers to probe: ``all`` or ``1,3,5`` (1-based)."""

    probes: str = "abx,phone,speaker,pnmi"
    """Probes to run: any of abx, phone, speaker, pnmi, knnvc (comma-separated), or ``all``."""

    baselines: str = "mfcc,logmel,untrained"
    """Baseline rows: MFCC-39, 80-bin log-mel and the checkpoint's architecture at random
    initialization (``untrained``, needs a checkpoint); ``none`` for the model alone."""

    weighted_sum: bool = True
    """Also probe SUPERB's learned softmax-weighted sum of all probed layers (the weights are
    learned by the frame phone probe and reused by ABX and PNMI)."""

    reference: str = "auto"
    """Phone label set: ``auto`` takes ``phones50``, else ``phones100`` (read at every other
    frame), else runs no phone-based probe (with the reason in the output)."""

    split_seed: int = 0
    """Seed of the probe-train / probe-dev / probe-test split: within each speaker, utterances
    ranked by ``sha256(f"{split_seed}:{key}")`` fill train, dev and test in that order by the
    fractions below (see ``pretrain/probe/data.py``)."""

    train_fraction: float = 0.6
    """Share of utterances in probe-train."""

    dev_fraction: float = 0.2
    """Share of utterances in probe-dev (learning-rate selection); the rest is probe-test."""

    max_utterances: Optional[int] = None
    """Probe at most this many evaluation utterances (the first ones in shard order)."""

    pnmi_k: int = 100
    """Clusters of the per-layer k-means (fitted on probe-train frames, scored on probe-test)."""

    untrained_seed: int = 0
    """Seed of the untrained twin's random initialization."""

    abx: AbxConfig = field(default_factory=AbxConfig)
    """ABX discriminability (Libri-light / ZeroSpeech style)."""

    phone: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    """Frame phone classifier and CTC phone recognizer (both linear)."""

    speaker: LinearProbeConfig = field(default_factory=lambda: LinearProbeConfig(epochs=100))
    """Speaker identification from mean-pooled utterance features (linear)."""

    knnvc: KnnvcConfig = field(default_factory=KnnvcConfig)
    """kNN voice conversion between speakers of the evaluation set (``probes`` knnvc; its phone
    and speaker figures use the phone and speaker probes, which then run too)."""

    device: str = "auto"
    """``auto`` (CUDA when present, bf16 autocast), ``cpu`` or ``cuda``: where features are computed."""

    batch_samples: int = 1_600_000
    """Utterances per forward, up to this many padded samples."""

    threads: int = 0
    """Threads of the model forward, the ABX kernel (numba) and k-means (FAISS); 0: every core.
    The linear probes always use one (their matrices are small)."""

    step: Optional[int] = None
    """The training step of the checkpoint (recorded; the trainer sets it for ``probe.every``)."""

    def validate(self) -> None:
        parse_list(self.probes, PROBES, "probes")
        parse_list(self.baselines, BASELINES, "baselines")
        parse_layers(self.layers)
        if not (0 < self.train_fraction < 1 and 0 < self.dev_fraction < 1
                and self.train_fraction + self.dev_fraction < 1):
            raise ConfigError("train_fraction and dev_fraction must be in (0, 1) and leave a test share",
                              field="train_fraction")
        if self.max_utterances is not None and self.max_utterances < 3:
            raise ConfigError(f"must be >= 3, got {self.max_utterances}", field="max_utterances")
        if self.pnmi_k < 2:
            raise ConfigError(f"must be >= 2, got {self.pnmi_k}", field="pnmi_k")
        check_device(self.device)
        if self.threads < 0:
            raise ConfigError(f"must be >= 0, got {self.threads}", field="threads")
        if "untrained" in parse_list(self.baselines, BASELINES, "baselines") and self.checkpoint is None:
            raise ConfigError("the untrained baseline is the checkpoint's architecture: set checkpoint, "
                              "or leave 'untrained' out of baselines", field="baselines")


@dataclass
class TrainProbeConfig:
    """Probes of the checkpoints a training run saves (``probe.every``), without blocking it."""

    every: int = 0
    """Probe every this many checkpoints: steps that are multiples of ``every *
    checkpoint.every``, and the last step (0: never). Locally a background process per
    checkpoint (training goes on); under SLURM a job per checkpoint. Results land in
    ``run_dir/probes/step_N/`` and are logged to the run's TensorBoard and wandb at step N."""

    eval_shards: Optional[str] = None
    """Evaluation shards (see ``pretrain probe``); required when ``every`` > 0."""

    overrides: list[str] = field(default_factory=lambda: ["probes=abx,phone,speaker", "baselines=none"])
    """``key=value`` settings of each ``pretrain probe`` run (defaults: no PNMI, no baselines,
    to keep a probe quick)."""

    threads: int = 1
    """Threads of a local background probe (it shares the machine with training)."""

    slurm_profile: Optional[str] = None
    """Cluster profile of the probe jobs under SLURM. Unset: the profile the training job was
    launched with (``launch slurm`` exports it as ``PRETRAIN_SLURM_PROFILE``)."""

    wait_seconds: float = 1800
    """At the end of training, wait this long for local probes still running, so their results
    reach the dashboards (they are in ``run_dir/probes`` either way)."""

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"must be >= 0, got {self.every}", field="every")
        if self.every and not self.eval_shards:
            raise ConfigError("probe.every > 0 needs probe.eval_shards", field="eval_shards")
        if self.threads < 0:
            raise ConfigError(f"must be >= 0, got {self.threads}", field="threads")


@dataclass
class KnnvcCommandConfig:
    shards: str = MISSING
    """Shards holding both speakers, with a ``speaker`` per utterance (phone label sets, when
    there, add the content figure)."""

    source: str = MISSING
    """The speaker whose utterances are converted."""

    target: str = MISSING
    """The speaker they are converted to: all of its utterances form the reference set."""

    out: str = MISSING
    """Output folder: the WAVs, ``spectrograms.png``, ``knnvc.json``."""

    checkpoint: Optional[str] = None
    """The model: a ``model.pt``, a training checkpoint folder, or a ``transformers``
    Hubert/WavLM/Data2VecAudio/Wav2Vec2 folder. Unset: ``features`` must be a baseline."""

    features: str = "model"
    """``model`` (a layer of ``checkpoint``), or the baselines ``mfcc`` / ``logmel``."""

    layer: str = "6"
    """The model layer matched in (1-based): the paper's WavLM layer 6 by default (a model with
    fewer layers: its last, with a warning), or ``auto``: the best layer on the frame phone
    probe in ``layer_from``."""

    layer_from: Optional[str] = None
    """A ``probe.json`` of this model (``pretrain probe``), for ``layer: auto``."""

    source_keys: list[str] = field(default_factory=list)
    """Utterance keys to convert; empty: the source speaker's first ``max_sources``."""

    max_sources: int = 3
    """Source utterances converted when ``source_keys`` is empty."""

    max_reference_seconds: Optional[float] = None
    """Use at most this much of the target's speech as the reference (utterances in shard
    order); unset: all of it (the paper: the more, the better, saturating near 5 minutes)."""

    k: int = 4
    """Reference frames averaged per source frame."""

    window: int = 640
    """Overlap-add window in samples (Hann; 640 = 50 % overlap of the 320-sample hop)."""

    device: str = "auto"
    """Model forward and FAISS: ``auto`` (CUDA when present), ``cpu`` or ``cuda``."""

    threads: int = 0
    """CPU threads (model forward, FAISS); 0: every core."""

    def validate(self) -> None:
        if self.features not in ("model", "mfcc", "logmel"):
            raise ConfigError(f"must be model, mfcc or logmel, got '{self.features}'", field="features")
        if self.features == "model" and self.checkpoint is None:
            raise ConfigError("set checkpoint (or features=mfcc / logmel for a baseline)", field="checkpoint")
        if self.layer != "auto":
            try:
                if int(self.layer) < 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"must be a 1-based layer number or 'auto', got '{self.layer}'",
                                  field="layer") from None
        elif self.layer_from is None:
            raise ConfigError("layer: auto reads the best layer from a probe.json; set layer_from", field="layer")
        if self.source == self.target:
            raise ConfigError(f"source and target are the same speaker '{self.source}'", field="target")
        if self.k < 1 or self.max_sources < 1:
            raise ConfigError("k and max_sources must be >= 1", field="k")
        check_window(self.window)
        check_device(self.device)
