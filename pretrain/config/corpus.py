"""Configuration of ``pretrain corpus synth``: the synthetic multi-voice speech corpus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError

ALL_VOICES = ("festival-kal", "festival-ked", "festival-slt", "flite-awb", "flite-rms", "flite-slt", "flite-kal16",
              "espeak-m3", "espeak-f2", "espeak-f4", "espeak-klatt")
"""The voices ``pretrain.corpus.engines`` defines, named here so that the schema depends on
nothing (the engines module checks that the two agree at import)."""


@dataclass
class CorpusSynthConfig:
    out: str = MISSING
    """Directory the corpus is written to (created). It must be absent or empty unless
    ``overwrite`` is set, or hold a complete corpus of this very config (a rerun: nothing to
    do)."""

    count: Optional[int] = None
    """Number of utterances to synthesize (indices 0..count-1). Set exactly one of ``count``
    and ``hours``."""

    hours: Optional[float] = None
    """Amount of audio to synthesize: the corpus is the shortest prefix of the utterance
    sequence whose total duration reaches it, so the result does not depend on ``jobs``."""

    seed: int = 0
    """Seed of the whole corpus: texts, voices' speaking rates, edge silences and dither of
    utterance i come from a generator seeded with (seed, i)."""

    jobs: int = 0
    """Worker processes; 0 uses every core."""

    voices: list[str] = field(default_factory=lambda: list(ALL_VOICES))
    """Voices to use, assigned round-robin by utterance index. Choose from festival-kal,
    festival-ked, festival-slt, flite-awb, flite-rms, flite-slt, flite-kal16, espeak-m3,
    espeak-f2, espeak-f4, espeak-klatt (all by default)."""

    max_clauses: int = 3
    """Sentences have 1..max_clauses clauses (about 1.5 s per clause)."""

    rate_jitter: float = 0.1
    """Each utterance's durations are stretched by a factor drawn from
    U(1 - rate_jitter, 1 + rate_jitter), times ``stretch``."""

    stretch: float = 1.0
    """Mean duration factor of the whole corpus: 1.25 speaks 25 % slower, 0.8 faster (the
    robustness protocol's speaking-rate axis). 1.0 leaves the corpus bit-identical to one
    made without it."""

    edge_silence: list[float] = field(default_factory=lambda: [0.1, 0.3])
    """Range in seconds of the silence added before and after each utterance (drawn
    independently for each end), so that every utterance begins and ends in silence."""

    dither: float = 1e-4
    """Standard deviation of the Gaussian noise added to every sample (full scale is 1.0), so
    that silences are not digital zeros (log-energy features of zeros are -inf)."""

    chunk_size: int = 16
    """Utterances per worker task. Each task runs in a fresh process because espeak-ng keeps
    state between utterances; changing it can change espeak-ng's output bit-for-bit."""

    overwrite: bool = False
    """Delete an existing corpus in ``out`` before writing."""

    def validate(self) -> None:
        if (self.count is None) == (self.hours is None):
            raise ConfigError("set exactly one of 'count' and 'hours'", field="count")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"must be >= 1, got {self.count}", field="count")
        if self.hours is not None and not self.hours > 0:
            raise ConfigError(f"must be > 0, got {self.hours}", field="hours")
        if self.jobs < 0:
            raise ConfigError(f"must be >= 0, got {self.jobs}", field="jobs")
        if not self.voices:
            raise ConfigError("needs at least one voice", field="voices")
        for name in self.voices:
            if name not in ALL_VOICES:
                raise ConfigError(f"unknown voice '{name}'; choose from {', '.join(ALL_VOICES)}",
                                  field="voices")
        if len(set(self.voices)) != len(self.voices):
            raise ConfigError("lists a voice twice", field="voices")
        if self.max_clauses < 1:
            raise ConfigError(f"must be >= 1, got {self.max_clauses}", field="max_clauses")
        if not 0 <= self.rate_jitter < 0.5:
            raise ConfigError(f"must be in [0, 0.5), got {self.rate_jitter}", field="rate_jitter")
        if not 0.5 <= self.stretch <= 2.0:
            raise ConfigError(f"must be in [0.5, 2], got {self.stretch}", field="stretch")
        if len(self.edge_silence) != 2 or not 0 < self.edge_silence[0] <= self.edge_silence[1]:
            raise ConfigError(f"must be [min, max] with 0 < min <= max, got {list(self.edge_silence)}",
                              field="edge_silence")
        if not 0 <= self.dither < 0.01:
            raise ConfigError(f"must be in [0, 0.01), got {self.dither}", field="dither")
        if self.chunk_size < 1:
            raise ConfigError(f"must be >= 1, got {self.chunk_size}", field="chunk_size")


NOISE_KINDS = ("white", "pink", "brown", "babble", "hum", "clicks", "machine")


@dataclass
class NoiseSynthConfig:
    """``pretrain corpus noise``: a folder of varied non-speech noise clips for WavLM's mixing
    in tests and the demo. Real runs use a real noise corpus (the DNS-challenge noise set)."""

    out: str = MISSING
    """Directory the clips are written to (``<kind>/noise-<i>.flac``); build shards from it
    with ``pretrain shards build``. Must be absent or empty unless ``overwrite`` is set, or
    hold a complete noise corpus of this very config (a rerun: nothing to do)."""

    hours: float = 0.05
    """Total duration of the clips; clip i is ``clip_seconds`` long, drawn per clip."""

    clip_seconds: list[float] = field(default_factory=lambda: [3.0, 10.0])
    """Range [min, max] of a clip's duration in seconds."""

    kinds: list[str] = field(default_factory=lambda: list(NOISE_KINDS))
    """Kinds of noise, assigned round-robin by clip index: white/pink/brown (coloured noise,
    1/f^0, 1/f, 1/f^2 spectra), babble (4-8 overlapped talkers of a speech corpus), hum (mains
    hum at 50 or 60 Hz with harmonics), clicks (sparse decaying impulses), machine
    (amplitude-modulated band-limited noise, like a fan or engine)."""

    speech: Optional[str] = None
    """Speech corpus (folder made by ``pretrain corpus synth``) the babble is cut from; unset:
    ``babble_utterances`` utterances are synthesized for it (TTS) and removed afterwards."""

    babble_utterances: int = 16
    """Utterances synthesized for the babble when ``speech`` is unset."""

    level_dbfs: list[float] = field(default_factory=lambda: [-40.0, -20.0])
    """Range [min, max] of a clip's RMS level in dB full scale (mixing rescales every segment to
    its drawn energy ratio, so the level only matters to people listening)."""

    seed: int = 0
    """Clip i is drawn from a generator seeded with (seed, i)."""

    overwrite: bool = False
    """Delete the clips of an existing noise corpus in ``out`` first."""

    def validate(self) -> None:
        if not self.hours > 0:
            raise ConfigError(f"must be > 0, got {self.hours}", field="hours")
        if len(self.clip_seconds) != 2 or not 0.5 <= self.clip_seconds[0] <= self.clip_seconds[1]:
            raise ConfigError(f"must be [min, max] with 0.5 <= min <= max, got {list(self.clip_seconds)}",
                              field="clip_seconds")
        if not self.kinds:
            raise ConfigError("needs at least one kind", field="kinds")
        for kind in self.kinds:
            if kind not in NOISE_KINDS:
                raise ConfigError(f"unknown kind '{kind}'; choose from {', '.join(NOISE_KINDS)}", field="kinds")
        if self.babble_utterances < 1:
            raise ConfigError(f"must be >= 1, got {self.babble_utterances}", field="babble_utterances")
        if len(self.level_dbfs) != 2 or not self.level_dbfs[0] <= self.level_dbfs[1] < 0:
            raise ConfigError(f"must be [min, max] with min <= max < 0, got {list(self.level_dbfs)}",
                              field="level_dbfs")
