"""Configuration of ``pretrain shards build`` and ``pretrain shards verify``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"'{text}' is not a size such as 1GB, 500MB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class ShardsBuildConfig:
    input: str = MISSING
    """The corpus: a directory tree of audio files (anything soundfile reads; a directory made
    by ``pretrain corpus synth`` is read through its utterances.jsonl, with speakers, texts
    and alignments), a fairseq-style TSV manifest (root line, then relpath<TAB>nsamples), or a
    JSONL manifest (one object per line with ``audio`` and optional ``key``, ``speaker``,
    ``text``, ``align``; relative paths are relative to the manifest's folder)."""

    out: str = MISSING
    """Output directory of the shards, manifest.json and skipped.jsonl. Re-running the same
    build there resumes it: finished shards are kept."""

    per_shard: Optional[int] = None
    """Utterances per shard. Set at most one of ``per_shard`` and ``target_size``."""

    target_size: Optional[str] = "1GB"
    """Shard size bound, counted as 16-bit PCM bytes of the 16 kHz audio (FLAC shards come out
    smaller, typically 40-70 % of that). Ignored when ``per_shard`` is set."""

    jobs: int = 0
    """Worker processes, one shard at a time each; 0 uses every core."""

    audio_format: str = "flac"
    """How audio is stored in the shards: ``flac`` (lossless, 16-bit) or ``wav`` (16-bit PCM,
    larger but cheaper to decode)."""

    min_duration: float = 0.25
    """Utterances shorter than this many seconds (after resampling) are left out and reported."""

    overwrite: bool = False
    """Delete an existing, different build in ``out`` instead of refusing."""

    def validate(self) -> None:
        if self.per_shard is not None and self.per_shard < 1:
            raise ConfigError(f"must be >= 1, got {self.per_shard}", field="per_shard")
        if self.per_shard is None:
            if self.target_size is None:
                raise ConfigError("set one of 'per_shard' and 'target_size'", field="target_size")
            try:
                if parse_size(self.target_size) < 1:
                    raise ValueError(f"'{self.target_size}' is zero")
            except ValueError as e:
                raise ConfigError(str(e), field="target_size") from None
        if self.jobs < 0:
            raise ConfigError(f"must be >= 0, got {self.jobs}", field="jobs")
        if self.audio_format not in ("flac", "wav"):
            raise ConfigError(f"must be 'flac' or 'wav', got '{self.audio_format}'", field="audio_format")
        if self.min_duration < 0:
            raise ConfigError(f"must be >= 0, got {self.min_duration}", field="min_duration")


@dataclass
class ShardsVerifyConfig:
    dir: str = MISSING
    """Shard directory (holding manifest.json) to check."""

    jobs: int = 0
    """Worker processes, one shard at a time each; 0 uses every core."""

    def validate(self) -> None:
        if self.jobs < 0:
            raise ConfigError(f"must be >= 0, got {self.jobs}", field="jobs")
