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

    def validate(self) -> None:
        check_name(self.name, "name")
        if self.split is not None:
            check_name(self.split, "split")
