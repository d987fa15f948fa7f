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

    speaker_from: Optional[str] = None
    """Where an utterance's speaker (and chapter) comes from in its path below the corpus root:
    ``dir_level N`` (the N-th folder, 0 first; LibriSpeech ``SPEAKER/CHAPTER/...``: ``dir_level
    0``, the chapter then being level N+1) or ``regex PATTERN`` with the named groups
    ``speaker`` and optionally ``chapter`` (matched against the relative path). Unset: the
    speaker a manifest gives, if any."""

    transcripts: bool = True
    """Folder corpora: read LibriSpeech-style ``*.trans.txt`` files (lines ``<utterance id>
    <text>``) into each utterance's ``text``."""

    side_json: bool = True
    """Folder corpora: a ``.json`` file beside an audio file with the same stem (LibriLight's
    per-file metadata) goes into the utterance's metadata as ``meta``."""

    max_duration: Optional[float] = None
    """Utterances longer than this many seconds are handled by ``long_policy`` (unset: kept
    whole)."""

    long_policy: str = "split"
    """``split``: cut into segments of at most ``max_duration`` seconds at low-energy points
    (each keyed ``<key>__<start_ms>``); ``skip``: leave out and report."""

    subset: str = "all"
    """``all``, or ``train`` / ``valid``: the deterministic split given by ``valid_fraction``,
    ``split_by`` and ``split_seed`` (build twice, once per subset, into two folders)."""

    valid_fraction: float = 0.0
    """Share of speakers (or utterances) in the ``valid`` subset."""

    split_by: str = "speaker"
    """``speaker`` (no speaker in both subsets; utterances without a speaker go by key) or
    ``utterance``."""

    split_seed: int = 0
    """Seed of the subset assignment (a hash of seed and speaker or key)."""

    def validate(self) -> None:
        if self.speaker_from is not None:
            kind, _, arg = self.speaker_from.partition(" ")
            if kind == "dir_level":
                if not arg.strip().isdigit():
                    raise ConfigError(f"'dir_level N' needs a folder index, got '{self.speaker_from}'",
                                      field="speaker_from")
            elif kind == "regex":
                try:
                    pattern = re.compile(arg)
                except re.error as e:
                    raise ConfigError(f"not a regular expression: {e}", field="speaker_from") from None
                if "speaker" not in pattern.groupindex:
                    raise ConfigError("the regex needs a named group (?P<speaker>...)", field="speaker_from")
            else:
                raise ConfigError(f"must be 'dir_level N' or 'regex PATTERN', got '{self.speaker_from}'",
                                  field="speaker_from")
        if self.max_duration is not None and self.max_duration <= 1.0:
            raise ConfigError(f"must be > 1 second, got {self.max_duration}", field="max_duration")
        if self.long_policy not in ("split", "skip"):
            raise ConfigError(f"must be 'split' or 'skip', got '{self.long_policy}'", field="long_policy")
        if self.subset not in ("all", "train", "valid"):
            raise ConfigError(f"must be all, train or valid, got '{self.subset}'", field="subset")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.valid_fraction}", field="valid_fraction")
        if self.subset != "all" and self.valid_fraction == 0.0:
            raise ConfigError(f"subset={self.subset} needs a valid_fraction > 0", field="valid_fraction")
        if self.split_by not in ("speaker", "utterance"):
            raise ConfigError(f"must be 'speaker' or 'utterance', got '{self.split_by}'", field="split_by")
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
