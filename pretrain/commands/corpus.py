"""``pretrain corpus synth`` and ``pretrain corpus noise``."""

from __future__ import annotations

from pretrain.config.corpus import CorpusSynthConfig, NoiseSynthConfig
from pretrain.corpus.noise import synthesize_noise
from pretrain.corpus.synth import synthesize_corpus


def synth(cfg: CorpusSynthConfig, argv: list[str], progress: bool) -> int:
    summary = synthesize_corpus(cfg, progress=progress, argv=argv)
    print(f"wrote {summary['utterances']} utterances ({summary['seconds'] / 3600:.3f} h) from "
          f"{len(summary['voices'])} voices to {cfg.out}; {summary['failed']} failed")
    return 0 if summary["utterances"] > 0 else 1


def noise(cfg: NoiseSynthConfig, argv: list[str], progress: bool) -> int:
    summary = synthesize_noise(cfg, progress=progress, argv=argv)
    kinds = ", ".join(f"{k} {n}" for k, n in summary["per_kind"].items())
    print(f"wrote {summary['clips']} noise clips ({summary['seconds'] / 60:.1f} min: {kinds}) to {cfg.out}")
    return 0
