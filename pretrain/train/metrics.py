"""Rank 0's metric sinks: ``metrics.jsonl``, the console, TensorBoard and wandb.

wandb runs online when the user is logged in and offline otherwise (``log.wandb=auto``); its
run id is kept in ``run_dir/wandb_id`` and reused on every resume, so a run that was
interrupted ten times is still one continuous curve.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pretrain import __version__
from pretrain.config.core import git_commit
from pretrain.config.train import LogConfig
from pretrain.utils import redact

log = logging.getLogger(__name__)


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (a crash or a full disk mid-write) off ``path`` before appending to
    it, so that the next record does not fuse with it; returns the bytes cut."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        f.truncate(keep)
    log.warning("%s ended in a torn line (%d bytes, from a crash?); cut it off", path, len(data) - keep)
    return len(data) - keep


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; lines that are not JSON (a torn line) are skipped with
    a warning naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s line %d is not JSON (a torn write?); skipped", path, number)
    return records


def wandb_mode(setting: str) -> str:
    """``log.wandb`` as wandb takes it: ``auto`` is ``WANDB_MODE`` when set, else online when
    logged in, else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        import wandb

        return "online" if wandb.api.api_key else "offline"
    except Exception:  # noqa: BLE001 - no wandb settings at all: stay local
        return "offline"


def log_artifact(run, name: str, kind: str, files: list[Path], metadata: dict, aliases: list[str]) -> None:
    """``files`` as one wandb artifact of ``run``: the same bytes in wandb as on disk, so that a
    teammate can ``run.use_artifact(name).download()`` what the dashboard shows."""
    import wandb  # here: only when the run logs to wandb

    artifact = wandb.Artifact(name, type=kind, metadata=metadata)
    for path in files:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=aliases)


def checkpoint_artifact(checkpoint: Path, run_id: str) -> dict:
    """The final checkpoint as an artifact: the model file, its manifest (the sha256 of every
    file) and the run's config, not DeepSpeed's optimizer shards (they resume a run, and are
    several times the model's size)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    step = int(manifest["step"])
    return {"name": f"model-{run_id}", "kind": "model",
            "files": [checkpoint / "model.pt", checkpoint / "manifest.json", checkpoint.parents[1] / "config.yaml"],
            "metadata": {"step": step, "model_sha256": manifest["files"]["model.pt"],
                         "arch": manifest["model"]["arch"], "labels": manifest["labels"]},
            "aliases": ["latest", f"step_{step}"]}


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LogConfig, config: dict, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        repair_jsonl(self.run_dir / "metrics.jsonl")
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        mode = wandb_mode(cfg.wandb)
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            # The code that ran belongs with the config: a dashboard compares runs across commits.
            config = {**redact(config), "pretrain_version": __version__, "git_commit": git_commit()}
            self.wandb = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", mode=mode,
                                    dir=str(self.run_dir), config=config, name=cfg.wandb_name or self.run_dir.name,
                                    group=cfg.wandb_group, tags=list(cfg.wandb_tags) or None,
                                    job_type=cfg.wandb_job_type)
            self.wandb_id = run_id

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        named = {f"{prefix}{k}": v for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **named}) + "\n")
        if self.tb is not None:
            for k, v in named.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        self._wandb(lambda run: run.log(named, step=step))
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in named.items() if k in (f"{prefix}loss", f"{prefix}lr", f"{prefix}acc_masked",
                                                             f"{prefix}grad_norm", f"{prefix}audio_s_per_s",
                                                             f"{prefix}target_var", f"{prefix}pred_var"))
        print(f"step {step} {shown}", file=sys.stderr, flush=True)

    def log_probe(self, probe_step: int, metrics: dict[str, float]) -> None:
        """Probe results of the checkpoint of ``probe_step``, which finished later: TensorBoard
        takes them at their own step; wandb, whose steps only increase, against the
        ``probe_step`` axis."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": probe_step, "probe_step": probe_step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, probe_step)
            self.tb.flush()
        if self.wandb is not None and not getattr(self, "_probe_axis", False):
            self._wandb(lambda run: (run.define_metric("probe_step"),
                                     run.define_metric("probe/*", step_metric="probe_step")))
            self._probe_axis = True
        self._wandb(lambda run: run.log({**metrics, "probe_step": probe_step}))
        best = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("probe/best/")}
        print(f"probe of step {probe_step}: " + " ".join(f"{k}={v:.4g}" for k, v in best.items()),
              file=sys.stderr, flush=True)

    def log_checkpoint(self, checkpoint: Path) -> None:
        """The final checkpoint as a wandb artifact (``log.wandb_artifacts``)."""
        if self.enabled and self.wandb is not None:
            spec = checkpoint_artifact(Path(checkpoint), self.wandb_id)
            self._wandb(lambda run: log_artifact(run, **spec))
            log.info("logged %s to wandb as artifact %s:%s", checkpoint, spec["name"], spec["aliases"][1])

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        self._wandb(lambda run: run.finish())

    def _wandb(self, call) -> None:
        """``call(run)`` on the wandb run, if there is one. wandb works through a service
        process, which a stop signal to the whole job (SLURM's SIGTERM on a requeue) ends first:
        a failing sink is dropped with a warning, so that the checkpoint still happens
        (metrics.jsonl and TensorBoard keep every record)."""
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as e:  # noqa: BLE001 - whatever the service's failure, training goes on
            log.warning("wandb failed (%s: %s); logging to metrics.jsonl and TensorBoard only from here on",
                        type(e).__name__, e)
            self.wandb = None
