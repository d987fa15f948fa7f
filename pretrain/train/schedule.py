"""Learning rate as a pure function of the optimizer step: nothing to save, nothing to drift."""

from __future__ import annotations

from pretrain.config.train import OptimConfig


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then linear or polynomial decay to
    ``end_lr`` at ``max_steps`` (fairseq's ``polynomial_decay`` with ``power``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.end_lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    remaining = 1.0 - (step - cfg.warmup_steps) / span
    power = 1.0 if cfg.decay == "linear" else cfg.power
    return cfg.end_lr + (cfg.lr - cfg.end_lr) * remaining**power
