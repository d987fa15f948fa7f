"""Configuration of ``pretrain export hf``."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class ExportHfConfig:
    checkpoint: str = MISSING
    """A model file (model.pt) or a checkpoint folder holding one."""

    out: str = MISSING
    """Output folder: config.json, model.safetensors and preprocessor_config.json."""

    overwrite: bool = False
    """Replace files of ``out`` that hold something else (another export, someone's model;
    refused otherwise). Files holding exactly this export are left as they are."""
