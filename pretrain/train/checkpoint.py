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
exists and whose files match their sha256 (a mismatch is skipped with a warning naming the
file); every rank then loads that one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.distributed import DistEnv
from pretrain.distributed.engine import barrier, broadcast_object
from pretrain.utils import PretrainError, atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DS_TAG = "ds"
_STEP = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


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
    def __init__(self, root: str | Path, dist: DistEnv, keep_last: int = 2, pin: list[int] | None = None):
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last
        self.pin = set(pin or [])

    # ---- saving

    def save(self, engine: Any, step: int, rank_state: dict, config_hash: str, model_file=None) -> Path:
        tmp = self.root / f"step_{step}.tmp"
        final = self.root / f"step_{step}"
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False,
                               client_state={"step": step})
        buf = io.BytesIO()
        torch.save(rank_state, buf)
        atomic_write_bytes(tmp / f"rank_{self.dist.rank}.pt", buf.getvalue())
        if self.dist.is_main and model_file is not None:
            model_file(tmp / "model.pt")
        barrier()
        if self.dist.is_main:
            files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(tmp / MANIFEST, {"step": step, "world_size": self.dist.world_size,
                                               "config_hash": config_hash, "files": files})
            if final.exists():  # a stale copy of this very step (e.g. after a fallback)
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(self.root / "latest", f"step_{step}\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[self.keep_last:]:
            if step not in self.pin:
                shutil.rmtree(self.root / f"step_{step}", ignore_errors=True)

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
            elif _sha256(path) != digest:
                problems.append(f"{path} does not match its sha256")
        return problems

    def find_resume(self) -> int | None:
        """The newest intact checkpoint's step (decided by rank 0, agreed by all)."""
        choice = None
        if self.dist.is_main and self.root.is_dir():
            for leftover in self.root.glob("step_*.tmp"):
                log.warning("removing the unfinished checkpoint %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            for step in self.complete_steps():
                problems = self.verify(step)
                if not problems:
                    choice = step
                    break
                log.warning("skipping checkpoint step_%d: %s", step, "; ".join(problems))
        return broadcast_object(choice)

    def load(self, engine: Any, step: int) -> dict:
        """Load model/optimizer state into ``engine`` and return this rank's own state."""
        folder = self.root / f"step_{step}"
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["world_size"] != self.dist.world_size:
            raise PretrainError(
                f"checkpoint {folder} was written by {manifest['world_size']} processes, this run has "
                f"{self.dist.world_size}; resuming with another process count is not supported yet")
        path, _ = engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise PretrainError(f"DeepSpeed could not load {folder / DS_TAG}")
        rank_file = folder / f"rank_{self.dist.rank}.pt"
        return torch.load(rank_file, map_location="cpu", weights_only=False)
