"""Crash-safe checkpoints around DeepSpeed's own save.

DeepSpeed's ``save_checkpoint`` writes its ``latest`` file before the last barrier, saves no
RNG state and keeps client state on rank 0 only. So a checkpoint here is a folder that counts
only once it is complete:

1. every rank: ``engine.save_checkpoint(step_N.tmp, tag="ds", save_latest=False)``, then its
   own ``rank_R.pt`` (step, data loader state, python/numpy/torch RNG states), atomically;
2. barrier; rank 0 writes ``manifest.json`` (sha256 of every file, config hash, world size),
   renames ``step_N.tmp`` to ``step_N``, replaces ``latest`` atomically and deletes old
   checkpoints beyond ``keep_last`` (never pinned ones); barrier.

Loading runs no code from the files: ``rank_R.pt`` holds tensors and plain types and is
loaded with ``weights_only=True``; DeepSpeed's own files (which it unpickles in full) are
first checked against the short list of classes DeepSpeed writes, and refused, naming the
extra globals, otherwise. A run directory is still trusted input in other ways (its config is
run as given).

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

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config.train import TrainConfig
from pretrain.distributed import DistEnv
from pretrain.distributed.engine import barrier, broadcast_object, to_universal
from pretrain.model.hubert import LabelSpec
from pretrain.utils import PretrainError, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DS_TAG = "ds"
UNIVERSAL = "universal"
SAVE_PHASES = ("before_writes", "mid_write", "before_manifest", "before_rename", "before_latest")
"""Points of a save where tests kill a process (``crash``), in the order they are reached."""
_STEP = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    """The RNG states as tensors and plain types, so that ``rank_R.pt`` loads with
    ``weights_only=True`` (numpy's state holds an array, which would need unpickling)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    else:  # a checkpoint written before the plain form (its array was allowed on load)
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The classes DeepSpeed's own files pickle (measured on ZeRO 0-3 checkpoints, bf16 and fp32):
# plain records and enums. Anything else in a checkpoint is refused before DeepSpeed unpickles
# it (it loads its files with weights_only=False, which runs whatever code a pickle names).
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.checkpoint.constants.PARAM_SHAPES",
    "collections.OrderedDict",
    "torch.Size",
    "argparse.Namespace",
})
# Checkpoints written before rank states were plain types hold numpy's RNG array.
_LEGACY_NUMPY = ("numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
                 "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType")


def vet_deepspeed_files(folder: Path) -> None:
    """Refuse (naming file and globals) any pickle in ``folder`` that names a global outside
    ``DEEPSPEED_GLOBALS``: a run directory received from someone else must not run code."""
    for path in sorted(folder.rglob("*.pt")):
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in DEEPSPEED_GLOBALS]
        if unsafe:
            raise PretrainError(f"{path} names Python objects a checkpoint does not need ({', '.join(unsafe)}); "
                                "loading it would run their code, so it is refused. Only resume run directories "
                                "you trust")


def load_rank_state(path: Path) -> dict:
    """A ``rank_R.pt`` as tensors and plain types (``weights_only``; the numpy array of older
    checkpoints' RNG state is allowed, nothing else)."""
    unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in _LEGACY_NUMPY]
    if unsafe:
        raise PretrainError(f"{path} names Python objects a rank state does not hold ({', '.join(unsafe)}); "
                            "refused: loading it would run their code")
    allowed = []
    for name in _LEGACY_NUMPY:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(__import__(module, fromlist=[attr]), attr))
        except (ImportError, AttributeError):
            pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


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
        vet_deepspeed_files(source / DS_TAG)
        path, _ = engine.load_checkpoint(str(source), tag=DS_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise PretrainError(f"DeepSpeed could not load {source / DS_TAG}")

        def rank_state(r: int) -> dict:
            return load_rank_state(folder / f"rank_{r}.pt")

        if saved == self.dist.world_size:
            own = rank_state(self.dist.rank)
            return own, [own]
        everyone = [rank_state(r) for r in range(saved)]
        return (everyone[self.dist.rank] if self.dist.rank < saved else None), everyone


# ---- which checkpoints a config may resume from

RUNTIME_FIELDS = ("checkpoint_activations", "compile")
"""Model fields that change how a step is computed, not the model: free to differ on resume."""


def _comparable(model: dict) -> dict:
    """The model fields a checkpoint must agree on: no runtime fields, and for HuBERT none of
    data2vec's (as checkpoints from before data2vec recorded them; they shape no HuBERT)."""
    fields = {k: v for k, v in model.items() if k not in RUNTIME_FIELDS}
    if fields.get("objective", "hubert") == "hubert":
        fields.pop("objective", None)
        fields.pop("data2vec", None)
    return fields


def _model_fields(cfg: TrainConfig) -> dict:
    return _comparable(asdict(cfg.model))


def config_hash(cfg: TrainConfig) -> str:
    """Hash of what shapes the model: a checkpoint with another one must not be loaded."""
    return hashlib.sha256(json.dumps(_model_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def shape_record(cfg: TrainConfig, specs: list[LabelSpec]) -> dict:
    return {"model": _model_fields(cfg), "labels": [[s.name, s.num_classes, s.rate] for s in specs]}


def check_resumable(manifest: dict, cfg: TrainConfig, specs: list[LabelSpec], step: int) -> None:
    """Refuse a checkpoint whose model fields or label sets differ from this config, naming
    them. Everything else (logging, LR peak and schedule, total steps, data, checkpoint
    policy) may change between restarts."""
    if "model" not in manifest:  # written before the manifest held the fields
        if manifest["config_hash"] != config_hash(cfg):
            raise PretrainError(f"checkpoint step_{step} was trained with another model config; "
                                "start a new run_dir")
        return
    saved, mine = _comparable(manifest["model"]), shape_record(cfg, specs)["model"]
    changes = [f"model.{k}: {saved.get(k)!r} -> {mine.get(k)!r}"
               for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
    labels = [[s.name, s.num_classes, s.rate] for s in specs]
    if manifest["labels"] != labels:
        changes.append(f"data.labels (name, classes, rate): {manifest['labels']} -> {labels}")
    if changes:
        raise PretrainError(f"cannot resume from checkpoint step_{step}: these fields shape the model and "
                            f"differ from the checkpoint: {'; '.join(changes)}. Start a new run_dir to "
                            "train another model.")
