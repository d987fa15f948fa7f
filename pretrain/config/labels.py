"""Configuration of ``pretrain labels import`` and ``pretrain labels export`` (fairseq's
``.tsv`` + ``.km`` label files)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from pretrain.config.core import ConfigError, check_name


@dataclass
class LabelsImportConfig:
    shards: str = MISSING
    """Shard directory whose every utterance gets a label from the pair."""

    tsv: str = MISSING
    """fairseq manifest: the audio root on the first line, then ``relpath<TAB>num_samples``."""

    km: str = MISSING
    """fairseq labels: line i holds the space-separated frame labels of the .tsv's utterance i."""

    name: str = MISSING
    """Name of the label set written under ``<shards>/labels/<name>/``."""

    num_classes: Optional[int] = None
    """Number of classes (the k of the k-means); null: the largest label + 1."""

    rate: int = 50
    """Frames per second of the labels: 50 (a model layer, fairseq's iteration 2) or 100 (MFCC)."""

    overwrite: bool = False
    """Replace a label set of this name that the shards already have with other labels
    (refused otherwise; one holding exactly these labels is left as it is)."""

    def validate(self) -> None:
        check_name(self.name, "name")
        if self.rate not in (50, 100):
            raise ConfigError(f"must be 50 or 100, got {self.rate}", field="rate")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"must be >= 1, got {self.num_classes}", field="num_classes")


@dataclass
class LabelsExportConfig:
    shards: str = MISSING
    """Shard directory holding the label set."""

    name: str = MISSING
    """The label set to export."""

    out: str = MISSING
    """Output folder of ``<split>.tsv`` and ``<split>.km``."""

    split: Optional[str] = None
    """File name stem (fairseq's split name, e.g. ``train``); null: the label set's name."""

    overwrite: bool = False
    """Replace ``<split>.tsv`` / ``<split>.km`` already in ``out`` with other content (refused
    otherwise; files holding exactly what would be written are left as they are)."""

    def validate(self) -> None:
        check_name(self.name, "name")
        if self.split is not None:
            check_name(self.split, "split")


@dataclass
class LabelsAlignmentsConfig:
    shards: str = MISSING
    """Shard directory whose every utterance gets reference phone labels."""

    phone_map: str = MISSING
    """Lines ``<aligner phone> <phone>`` (``AH0 ah``, ``spn sil``); the right-hand phones are the
    classes, silence (``sil``, also empty intervals) first."""

    textgrids: Optional[str] = None
    """A folder of Praat TextGrids, ``<key>.TextGrid`` per utterance (Montreal Forced Aligner
    output mirrors the corpus tree, which is what keys are made of)."""

    frames: Optional[str] = None
    """Instead of ``textgrids``: a file of lines ``<key> <phone> <phone> ...``, one phone per frame
    at ``frame_rate``."""

    frame_rate: int = 100
    """Frames per second of ``frames``."""

    tier: str = "phones"
    """The TextGrid tier with the phone intervals (MFA: ``phones``)."""

    prefix: str = "phones"
    """Label set names: ``<prefix>50`` and ``<prefix>100`` (``phones`` is what ``kmeans quality``
    and the probes look for)."""

    tolerance: float = 0.05
    """Seconds an alignment's end may differ from its audio's (aligners round to 10 ms frames)."""

    overwrite: bool = False
    """Replace label sets ``<prefix>50`` / ``<prefix>100`` the shards already have (a synthetic
    corpus's shards hold its gold ``phones50``/``phones100``) when they hold other labels
    (refused otherwise; sets holding exactly these labels are left as they are)."""

    def validate(self) -> None:
        if (self.textgrids is None) == (self.frames is None):
            raise ConfigError("set exactly one of 'textgrids' and 'frames'", field="textgrids")
        check_name(self.prefix + "50", "prefix")
        if self.tolerance < 0:
            raise ConfigError(f"must be >= 0 seconds, got {self.tolerance}", field="tolerance")
        if self.frame_rate < 1:
            raise ConfigError(f"must be >= 1, got {self.frame_rate}", field="frame_rate")
