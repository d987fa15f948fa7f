"""Configuration of ``pretrain status``."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class StatusConfig:
    run_dir: str = MISSING
    """An ``iterate`` or ``train`` run directory."""

    json: bool = False
    """Print one JSON object instead of the table."""
