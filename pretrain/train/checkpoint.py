"""Crash-safe checkpoints around DeepSpeed's own save.

DeepSpeed's ``save_checkpoint`` writes its ``latest`` file before the last barrier, saves no
RNG state and keeps client state on rank 0 only. So a checkpoint here is a folder that counts
only once it is complete:

1. every rank: ``engine.save_checkpoint(step_N.tmp, tag="ds", save_latest=False)``, then its
   own ``rank_R.pt`` (step, data loader state, python/numpy/torch RNG states), atomically;
2. barrier; rank 0 writes ``manifest.json`` (sha256 of every file, config hash, world size),
   renames ``step_N.tmp`` to ``step_N``, replaces ``latest`` atomically and deletes old
   checkpoints beyond ``keep_last`` (never pinned ones); barrier.

On start, rank 0 removes ``*.tmp`` leftovers and picks the newest ``step_N`` whose manifest
exists and whose files match their sha256; every rank then loads that one. A checkpoint that
fails verification is renamed ``step_N.bad`` (quarantined, with a warning naming the file): it
is never loaded, pruned or counted again, and stays for inspection. When checkpoints exist but
none verifies, the start is refused (``checkpoint.start_over`` overrides) rather than silently
training from step 0 over the run's progress.

Pruning keeps the newest save and the newest ``keep_last`` checkpoints among those verified
at start or written by this process; it deletes only older complete ones (never pinned ones,
never one newer than the save).

Another process count: with ZeRO 1-3 the optimizer state is partitioned by rank, so rank 0
first converts ``step_N/ds`` into DeepSpeed's universal format (``step_N/universal/``, written
under a temporary name and renamed, reused by later restarts) and the engine is built to load
that. Rank ``r`` takes the RNG states of old rank ``r`` when it existed; the data loader gets the
states of all old ranks and applies its repartition policy
(:meth:`pretrain.data.pipeline.ShardLoader.load_repartitioned`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.data.shards import sha256_file
from pretrain.distributed import DistEnv
from pretrain.distributed.engine import barrier, broadcast_object, to_universal
from pretrain.utils import PretrainError, atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DS_TAG = "ds"
UNIVERSAL = "universal"
SAVE_PHASES = ("before_writes", "mid_write", "before_manifest", "before_rename", "before_latest")
"""Points of a save where tests kill a process (``crash``), in the order they are reached."""
_STEP = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: str | Path, dist: DistEnv, keep_last: int = 2, pin: list[int] | None = None,
                 crash: dict | None = None, start_over: bool = False):
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last
        self.pin = set(pin or [])
        self.start_over = start_over
        self.verified: set[int] = set()
        """Steps known good: verified at start or written by this process."""
        # Tests only: {"step": N, "phase": one of SAVE_PHASES, "rank": r} kills rank r there.
        self.crash = crash or {}

    def _phase(self, step: int, phase: str) -> None:
        c = self.crash
        if c.get("step") == step and c.get("phase") == phase and c.get("rank", 0) == self.dist.rank:
            log.warning("test fault: killing rank %d at save phase %s of step %d", self.dist.rank, phase, step)
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- saving

    def save(self, engine: Any, step: int, rank_state: dict, config_hash: str, model_file=None,
             meta: dict | None = None) -> Path:
        """Write ``step_N`` (see the module docstring); ``meta`` goes into the manifest."""
        tmp = self.root / f"step_{step}.tmp"
        final = self.root / f"step_{step}"
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        self._phase(step, "before_writes")
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False,
                               client_state={"step": step})
        self._phase(step, "mid_write")
        buf = io.BytesIO()
        torch.save(rank_state, buf)
        atomic_write_bytes(tmp / f"rank_{self.dist.rank}.pt", buf.getvalue())
        if self.dist.is_main and model_file is not None:
            model_file(tmp / "model.pt")
        barrier()
        if self.dist.is_main:
            self._phase(step, "before_manifest")
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(tmp / MANIFEST, {"step": step, "world_size": self.dist.world_size,
                                               "config_hash": config_hash, **(meta or {}), "files": files})
            self._phase(step, "before_rename")
            if final.exists():  # a stale copy of this very step (e.g. after a fallback)
                shutil.rmtree(final)
            tmp.rename(final)
            self._phase(step, "before_latest")
            atomic_write_text(self.root / "latest", f"step_{step}\n")
            self.verified.add(step)
            self._prune(step)
        barrier()
        return final

    def _prune(self, saved: int) -> None:
        keep = {saved, *sorted(self.verified, reverse=True)[:self.keep_last]}
        oldest_kept = min(keep)
        for step in self.complete_steps():
            if step in keep or step in self.pin:
                continue
            if step > saved:
                log.warning("not pruning checkpoint step_%d: it is newer than the one just saved (step_%d) "
                            "and was not written by this run", step, saved)
            elif step < oldest_kept:
                shutil.rmtree(self.root / f"step_{step}", ignore_errors=True)
                self.verified.discard(step)

    def quarantine(self, step: int, problems: list[str]) -> Path:
        """Rename a damaged ``step_N`` to ``step_N.bad``: never loaded, pruned or counted again."""
        target = self.root / f"step_{step}.bad"
        if target.exists():
            target = self.root / f"step_{step}.bad.{time.strftime('%Y%m%dT%H%M%S')}"
        (self.root / f"step_{step}").rename(target)
        log.warning("checkpoint step_%d is damaged (%s); quarantined as %s", step, "; ".join(problems), target)
        return target

    def quarantined(self) -> list[Path]:
        return sorted(self.root.glob("step_*.bad*")) if self.root.is_dir() else []

    # ---- finding and loading

    def complete_steps(self) -> list[int]:
        """Steps with a complete (manifest-bearing) folder, newest first."""
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.iterdir():
            match = _STEP.match(path.name)
            if match and path.is_dir() and (path / MANIFEST).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps, reverse=True)

    def verify(self, step: int) -> list[str]:
        folder = self.root / f"step_{step}"
        manifest = json.loads((folder / MANIFEST).read_text())
        problems = []
        for rel, digest in manifest["files"].items():
            path = folder / rel
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif sha256_file(path) != digest:
                problems.append(f"{path} does not match its sha256")
        return problems

    def find_resume(self) -> int | None:
        """The newest intact checkpoint's step (decided by rank 0, agreed by all); damaged
        ones are quarantined. ``PretrainError`` on every rank when checkpoints exist but none
        verifies (unless ``start_over``)."""
        choice, refusal = None, None
        if self.dist.is_main and self.root.is_dir():
            for leftover in self.root.glob("step_*.tmp"):
                log.warning("removing the unfinished checkpoint %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            for step in self.complete_steps():
                problems = self.verify(step)
                if not problems:
                    choice = step
                    break
                self.quarantine(step, problems)
            bad = self.quarantined()
            if choice is None and bad and not self.start_over:
                refusal = (f"{self.root} holds checkpoints but none passes verification (quarantined: "
                           f"{', '.join(p.name for p in bad)}); refusing to train from step 0 over this run. "
                           "Restore a good checkpoint, or set checkpoint.start_over=true to start afresh")
            if choice is None and bad and self.start_over:
                log.warning("no checkpoint in %s verifies; starting from step 0 (checkpoint.start_over)", self.root)
        choice, refusal = broadcast_object((choice, refusal))
        if refusal:
            raise PretrainError(refusal)
        if choice is not None:
            self.verified.add(choice)
        return choice

    def manifest(self, step: int) -> dict:
        return json.loads((self.root / f"step_{step}" / MANIFEST).read_text())

    def prepare_load(self, step: int, zero_stage: int) -> bool:
        """Whether ``step`` must be loaded through the universal format (written by another
        process count with partitioned optimizer state); if so, rank 0 converts it first."""
        saved = self.manifest(step)["world_size"]
        if saved == self.dist.world_size or zero_stage == 0:
            return False  # ZeRO 0 keeps the whole optimizer state in the model-states file
        folder = self.root / f"step_{step}"
        if self.dist.is_main and not (folder / UNIVERSAL).is_dir():
            log.warning("checkpoint %s was written by %d processes, this run has %d: converting it to "
                        "DeepSpeed's universal format", folder, saved, self.dist.world_size)
            tmp = folder / f"{UNIVERSAL}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            to_universal(str(folder / DS_TAG), str(tmp / DS_TAG))
            tmp.rename(folder / UNIVERSAL)
        barrier()
        return True

    def load(self, engine: Any, step: int, universal: bool = False) -> tuple[dict | None, list[dict]]:
        """Load model/optimizer state into ``engine``.

        Returns this rank's own saved state (``None`` when the checkpoint had fewer ranks) and
        the saved states of every old rank (for the data loader's repartition policy).
        """
        folder = self.root / f"step_{step}"
        saved = self.manifest(step)["world_size"]
        source = folder / UNIVERSAL if universal else folder
        path, _ = engine.load_checkpoint(str(source), tag=DS_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise PretrainError(f"DeepSpeed could not load {source / DS_TAG}")

        def rank_state(r: int) -> dict:
            return torch.load(folder / f"rank_{r}.pt", map_location="cpu", weights_only=False)

        if saved == self.dist.world_size:
            own = rank_state(self.dist.rank)
            return own, [own]
        everyone = [rank_state(r) for r in range(saved)]
        return (everyone[self.dist.rank] if self.dist.rank < saved else None), everyone
