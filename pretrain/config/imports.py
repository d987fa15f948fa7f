"""Configuration of ``pretrain import hf`` and ``pretrain import fairseq``."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class ImportHfConfig:
    source: str = MISSING
    """A transformers HubertModel or WavLMModel folder (config.json, weights)."""

    out: str = MISSING
    """The model file to write (``.../model.pt``): the backbone, no label sets."""

    overwrite: bool = False
    """Replace a file already at ``out`` that holds another model (refused otherwise; one
    holding this very model is left as it is; never one inside a checkpoint folder, whose
    manifest it would break)."""


@dataclass
class ImportFairseqConfig:
    source: str = MISSING
    """A fairseq HuBERT checkpoint (``.pt`` with ``cfg``/``args`` and ``model``)."""

    out: str = MISSING
    """The model file to write (``.../model.pt``): the backbone, no label sets."""

    overwrite: bool = False
    """Replace a file already at ``out`` that holds another model (refused otherwise; one
    holding this very model is left as it is; never one inside a checkpoint folder, whose
    manifest it would break)."""
