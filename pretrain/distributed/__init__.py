"""Everything that knows about processes: the launch environment, the process group, the
DeepSpeed engine and the collectives the trainer needs. Nothing else imports
``torch.distributed`` or ``deepspeed``."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list, expanded as SLURM does (python-hostlist):
    ``node[01-02]-ib`` -> ``node01-ib``, ``r[1-2]n[01-04]`` -> ``r1n01``, ``gpu[003-005,009],cpu1``
    -> ``gpu003``. (A regex used to make ``node01`` and ``r1`` of the first two.)"""
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as e:
        raise ValueError(f"cannot expand SLURM node list '{nodelist}': {e}") from None
    if not hosts:
        raise ValueError(f"SLURM node list '{nodelist}' is empty")
    return hosts[0]


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: from its id, so that two jobs sharing a node differ
    (the sbatch template exports the same value)."""
    return 20000 + job_id % 20000


def read_env(environ: dict | None = None) -> DistEnv:
    """The process's place in the job, from torchrun's variables or else SLURM's (one task per
    GPU); a plain single process otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or first_host(nodelist),
                       int(env.get("MASTER_PORT") or slurm_port(job)))
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)))


def export_env(dist: DistEnv) -> None:
    """Set the variables torch.distributed and DeepSpeed read, whatever launched us."""
    os.environ.update({"RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size),
                       "LOCAL_RANK": str(dist.local_rank), "MASTER_ADDR": dist.master_addr,
                       "MASTER_PORT": str(dist.master_port)})


def slurm_job_id(environ: dict | None = None) -> str | None:
    """This job's id under SLURM (an array task's own id), else None."""
    return (os.environ if environ is None else environ).get("SLURM_JOB_ID")


def slurm_restart_count(environ: dict | None = None) -> int:
    """How many times SLURM has requeued this job: unset on the first run, 1, 2, ... after."""
    return int((os.environ if environ is None else environ).get("SLURM_RESTART_COUNT", "0") or 0)


def requeue_slurm_job(job_id: str, attempts: int = 5, delay: float = 2.0, timeout: float = 30.0) -> None:
    """Put this job back in the queue (same id); SLURM then stops every task with SIGTERM.

    A preempted job must do this itself: one that checkpoints and exits 0 is marked
    COMPLETED and never runs again. slurmctld can be briefly unreachable or busy exactly when
    a preemption notice arrives (it is preempting jobs), and one failed call would turn the
    preemption into a lost job: a failure (an error exit or no answer in ``timeout`` seconds)
    is retried after ``delay`` seconds, doubling each time (2, 4, 8, 16 s by default, 30 s of
    waiting in all, inside the usual preemption grace time). Raises once all ``attempts``
    failed, with each one's error."""
    failures = []
    for attempt in range(1, attempts + 1):
        try:
            proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0:
                if failures:
                    log.info("scontrol requeue %s succeeded at attempt %d", job_id, attempt)
                return
            failures.append(f"exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        except subprocess.TimeoutExpired:
            failures.append(f"no answer in {timeout:g} s")
        if attempt < attempts:
            wait = delay * 2 ** (attempt - 1)
            log.warning("scontrol requeue %s failed (%s); retrying in %g s (attempt %d of %d)",
                        job_id, failures[-1], wait, attempt + 1, attempts)
            time.sleep(wait)
    raise RuntimeError(f"scontrol requeue {job_id} failed {attempts} times: " +
                       "; ".join(f"{i}. {f}" for i, f in enumerate(failures, 1)))
