"""Failures injected at named points of the training loop, for the recovery tests only: the
``PRETRAIN_FAULT`` environment variable (JSON) names them; real runs have none, and every hook
is then a no-op.

``{"nan_at": step, "nan_rank": r}`` puts a NaN into that rank's loss at that step;
``{"nan_grad_at": step, "rank": r}`` into one gradient; ``{"kill_at": step, "rank": r}``
SIGKILLs rank r mid-step; ``{"crash_save": {"step", "phase", "rank"}}`` SIGKILLs a rank inside
a save (``pretrain.train.checkpoint.SAVE_PHASES``); ``{"exit_after_save": step}`` ends the
process right after saving; ``{"raise_at": step, "rank": r, "where": "forward" | "save" |
"probe"}`` raises an error there; ``{"stall_at": step, "rank": r}`` makes rank r hang in that
step. Steps are optimizer steps; ``raise_at`` and ``stall_at`` count from 1, the others from 0.
"""

from __future__ import annotations

import logging
import threading

from pretrain.utils import PretrainError

log = logging.getLogger(__name__)


class Faults:
    def __init__(self, spec: dict | None, rank: int):
        self.spec = spec or {}
        self.rank = rank

    def _here(self) -> bool:
        return self.rank == self.spec.get("rank", self.rank)

    @property
    def crash_save(self) -> dict | None:
        return self.spec.get("crash_save")

    def step_start(self, step: int) -> None:
        """Before step ``step + 1`` reads its batches."""
        if self.spec.get("stall_at") == step + 1 and self._here():
            log.warning("test fault: this rank hangs in step %d", step + 1)
            threading.Event().wait()

    def in_step(self, step: int) -> tuple[bool, dict]:
        """For ``forward_backward`` of step ``step + 1``: whether to put a NaN into this rank's
        loss, and its ``fault`` argument."""
        here = self._here()
        return (self.spec.get("nan_at") == step and self.spec.get("nan_rank") == self.rank,
                {"kill": self.spec.get("kill_at") == step and here,
                 "nan_grad": self.spec.get("nan_grad_at") == step and here,
                 "raise": self._raise_at(step + 1) == "forward"})

    def _raise_at(self, step: int) -> str | None:
        return self.spec.get("where") if self.spec.get("raise_at") == step and self._here() else None

    def before_save(self, step: int) -> None:
        if self._raise_at(step) == "save":
            raise RuntimeError(f"test fault: an error while saving step {step}")

    def before_probe(self, step: int) -> None:
        """After the checkpoint of ``step`` is saved, before its probe starts."""
        if self._raise_at(step) == "probe":
            raise PretrainError(f"test fault: the probe of step {step} could not start")

    def exit_after_save(self, step: int) -> bool:
        """Whether the process must end right after the checkpoint of ``step``."""
        return self.spec.get("exit_after_save") == step
