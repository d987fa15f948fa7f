"""Configuration of the streaming data pipeline (``pretrain.data.pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError


@dataclass
class MixingConfig:
    """WavLM's utterance mixing (``pretrain.data.mixing``), done in the data workers. Defaults
    are those of WavLM's released data code (see ../shared/notes/hubert-recipe.md §2.4), except
    ``prob``, which is 0 (off) so that HuBERT runs are unchanged; WavLM configs set 0.2."""

    prob: float = 0.0
    """Probability that an utterance gets a segment of noise or of another utterance mixed in
    (WavLM: 0.2). The labels stay those of the primary utterance."""

    noise_prob: float = 0.5
    """Of the mixed utterances, the fraction mixed with noise rather than speech."""

    noise_shards: Optional[str] = None
    """Shard directory of a noise corpus (``pretrain shards build`` of any folder of noise,
    e.g. DNS-challenge noise; ``pretrain corpus noise`` makes a synthetic one). Required when
    ``prob`` and ``noise_prob`` are both above 0."""

    max_length_ratio: float = 0.5
    """The mixed segment is 1 .. this fraction of the primary utterance's (cropped) length."""

    speech_snr: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    """Range [low, high] in dB of the energy ratio primary : mixed-in speech segment, drawn
    uniformly."""

    noise_snr: list[float] = field(default_factory=lambda: [-5.0, 20.0])
    """Range [low, high] in dB of the energy ratio primary : noise segment, drawn uniformly."""

    def validate(self) -> None:
        for name in ("prob", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"must be in [0, 1], got {getattr(self, name)}", field=name)
        if not 0.0 < self.max_length_ratio <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.max_length_ratio}", field="max_length_ratio")
        for name in ("speech_snr", "noise_snr"):
            r = list(getattr(self, name))
            if len(r) != 2 or not r[0] <= r[1]:
                raise ConfigError(f"must be [low, high] with low <= high, got {r}", field=name)
        if self.prob > 0 and self.noise_prob > 0 and not self.noise_shards:
            raise ConfigError("is required when prob > 0 and noise_prob > 0 (set noise_prob=0 to mix "
                              "speech only)", field="noise_shards")


@dataclass
class DataConfig:
    shards: str = MISSING
    """Shard directory made by ``pretrain shards build`` (holding manifest.json)."""

    labels: list[str] = field(default_factory=list)
    """Label sets (``labels/<name>/`` beside the shards) joined to the audio by key; several
    give several targets."""

    seed: int = 1
    """Seed of the data order: shard order, within-shard order, crops and batch order are pure
    functions of (seed, epoch)."""

    max_sample_size: int = 250000
    """Longer utterances are cropped to this many samples (HuBERT: 250k = 15.6 s)."""

    min_sample_size: int = 32000
    """Shorter utterances are dropped and counted (HuBERT: 32k = 2 s)."""

    max_tokens: int = 1400000
    """Batch budget in samples including padding: batch size times the longest cropped
    utterance in it stays within this (HuBERT BASE: 1.4M per GPU)."""

    pad_audio: bool = False
    """Pad a batch to its longest utterance (with a padding mask); false crops every
    utterance to the batch's shortest, as HuBERT's recipe does, because the group-norm waveform
    encoder of BASE normalizes over time and would see the padding. Length bucketing keeps
    the cut small."""

    random_crop: bool = True
    """Crop at a random offset (a multiple of 320 samples, so labels stay on their frames);
    false crops from the start."""

    shuffle: bool = True
    """Shuffle shards, samples within shards and batches; false keeps manifest order (still
    length-bucketed)."""

    shuffle_window: int = 2000
    """Samples read ahead and permuted within a shard; bounds each worker's memory to this many
    compressed utterances."""

    bucket_size: int = 256
    """Utterances sorted by length together to form batches with little padding."""

    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""

    infinite: bool = False
    """Stream epoch after epoch without end (each worker crosses epoch boundaries on its own);
    false iterates one epoch per ``iter()``."""

    on_error: str = "raise"
    """A corrupt sample or shard: ``raise`` stops with an error naming shard and key; ``skip``
    leaves it out, counts it in the metrics and in the loader state, and logs it."""

    mixing: MixingConfig = field(default_factory=MixingConfig)
    """WavLM utterance/noise mixing (off by default)."""

    def validate(self) -> None:
        if self.min_sample_size < 0:
            raise ConfigError(f"must be >= 0, got {self.min_sample_size}", field="min_sample_size")
        if self.max_sample_size < max(self.min_sample_size, 400):
            raise ConfigError(f"must be >= min_sample_size and >= 400, got {self.max_sample_size}",
                              field="max_sample_size")
        if self.max_tokens < self.max_sample_size:
            raise ConfigError(f"must be >= max_sample_size ({self.max_sample_size}) so that every "
                              f"utterance fits a batch, got {self.max_tokens}", field="max_tokens")
        for name in ("shuffle_window", "bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.num_workers < 0:
            raise ConfigError(f"must be >= 0, got {self.num_workers}", field="num_workers")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"must be 'raise' or 'skip', got '{self.on_error}'", field="on_error")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("lists a label set twice", field="labels")
