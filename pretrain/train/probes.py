"""Probes of the checkpoints a training run saves (``probe.every``), run beside training.

Rank 0 starts a probe for a checkpoint right after saving it: locally a background
``pretrain probe`` process, under SLURM a job submitted with ``launch slurm`` and the
training job's profile. The probe reads a hard link of the checkpoint's ``model.pt`` in
``run_dir/probes/step_N/`` (so pruning the checkpoint cannot pull the file away) and checks its
sha256 against the checkpoint manifest. Training never waits for a probe, except at its very
end for local ones (``probe.wait_seconds``). At every log step rank 0 collects the probes that
have finished (``probe.json``) and logs them at their own step to TensorBoard and wandb
(``probe/...`` metrics against ``probe_step``); a ``.logged`` mark keeps a resumed run from
logging one twice and lets it pick up probes that finished while it was down.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.config.train import TrainConfig
from pretrain.lifecycle import on_abort
from pretrain.probe.results import probe_metrics_flat, read_probe

log = logging.getLogger(__name__)

PROBES_DIR = "probes"


class ProbeScheduler:
    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool, slurm_job: str | None):
        self.cfg = cfg.probe
        self.every_steps = cfg.probe.every * cfg.checkpoint.every
        self.max_steps = cfg.optim.max_steps
        self.dir = run_dir / PROBES_DIR
        self.enabled = enabled and cfg.probe.every > 0
        self.slurm = slurm_job is not None
        self.running: dict[int, subprocess.Popen] = {}
        # A trainer that fails takes its local probes with it (nothing of a failed job runs on).
        on_abort(self.kill)

    def kill(self) -> None:
        """Stop the local probes still running, with everything they started."""
        for proc in self.running.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.every_steps == 0 or step == self.max_steps)

    def start(self, step: int, checkpoint: Path) -> None:
        """Start the probe of the checkpoint just saved at ``step``."""
        out = self.dir / f"step_{step}"
        if (out / "probe.json").is_file():
            return  # probed before a restart
        out.mkdir(parents=True, exist_ok=True)
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        model = out / "model.pt"
        model.unlink(missing_ok=True)
        try:
            os.link(checkpoint / "model.pt", model)
        except OSError:  # another file system: a copy
            shutil.copyfile(checkpoint / "model.pt", model)
        argv = ["probe", "--checkpoint", str(model), "--eval-shards", str(self.cfg.eval_shards), "--out", str(out),
                f"checkpoint_sha256={manifest['files']['model.pt']}", f"step={step}", f"threads={self.cfg.threads}",
                *self.cfg.overrides]
        if self.slurm:
            profile = self.cfg.slurm_profile or os.environ.get("PRETRAIN_SLURM_PROFILE")
            cmd = [sys.executable, "-m", "launch.cli", "slurm", *(["--profile", profile] if profile else []),
                   "--job-dir", str(out / "slurm"), "pretrain", *argv]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                log.warning("step %d: could not submit the probe job (%s); training goes on",
                            step, proc.stderr.strip()[-500:])
            else:
                log.info("step %d: probe job %s submitted", step, proc.stdout.split()[0] if proc.stdout else "?")
            return
        with open(out / "probe.log", "ab") as f:
            # Its own session: a signal to the training job (SIGUSR1) is not the probe's.
            self.running[step] = subprocess.Popen([sys.executable, "-m", "pretrain.cli", *argv, "--no-progress"],
                                                  stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("step %d: probe started in the background (%s)", step, out)

    def collect(self, logger) -> list[int]:
        """Log every finished, not yet logged probe; returns their steps."""
        if not self.enabled and not self.dir.is_dir():
            return []

        done = []
        for step, proc in list(self.running.items()):
            if proc.poll() is not None:
                del self.running[step]
                if proc.returncode != 0:
                    log.warning("step %d: the probe failed (exit %d), see %s", step, proc.returncode,
                                self.dir / f"step_{step}" / "probe.log")
        for result in sorted(self.dir.glob("step_*/probe.json"), key=lambda p: int(p.parent.name[5:])):
            mark = result.parent / ".logged"
            if mark.exists():
                continue
            step = int(result.parent.name[5:])
            logger.log_probe(step, probe_metrics_flat(read_probe(result)))
            mark.write_text("")
            (result.parent / "model.pt").unlink(missing_ok=True)  # the link's job is done
            done.append(step)
        return done

    def finish(self, logger) -> None:
        """At the end of training: wait (bounded) for local probes, then log them."""
        deadline = time.monotonic() + self.cfg.wait_seconds
        for step, proc in list(self.running.items()):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("step %d: probe still running after probe.wait_seconds; its results will be in %s",
                            step, self.dir / f"step_{step}")
        self.collect(logger)
