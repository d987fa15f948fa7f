"""``pretrain probe``."""

from __future__ import annotations

from pathlib import Path

from pretrain.config.probe import ProbeConfig
from pretrain.probe.run import probe


def probe_command(cfg: ProbeConfig, argv: list[str], progress: bool) -> int:
    record = probe(cfg, progress=progress, argv=argv)
    print((Path(cfg.out) / "probe.md").read_text(), end="")
    print(f"wrote {cfg.out}/probe.json, probe.md, probe.png in {record['seconds']['total']:.1f} s")
    return 0
