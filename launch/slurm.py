"""``launch slurm``: render a stage's sbatch script from a template and a cluster profile, keep
it with a snapshot of the resolved config and the code version, and submit it.

A submission writes, in the stage's job folder (``<run_dir>/slurm`` for training, ``<out>/slurm``
for features / k-means fit / quality, ``<shards>/labels/<name>/slurm`` for label assignment,
or ``--job-dir``):

- ``<tag>.sbatch``: the rendered script (what was submitted, byte for byte),
- ``<tag>.config.yaml``: the resolved stage config; the job runs ``pretrain STAGE --config``
  on it, so what runs is exactly what was checked at submission,
- ``<tag>.launch.json``: command line, profile, code version (package and git commit),
  submission time, job id and dependencies,
- ``<tag>-<jobid>.out`` (``<tag>-<jobid>_<task>.out`` for arrays): the job's log, appended
  to across requeues.

Training runs one process per GPU under ``srun`` and handles the preemption signal itself
(checkpoint, ``scontrol requeue``). Offline stages run as single or array jobs whose batch shell
requeues on the signal; they are idempotent per shard, so a requeued task only redoes its
unfinished shards.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pretrain import __version__
from pretrain.config import load_config, to_yaml, write_run_record
from pretrain.config.core import git_commit, refuse_foreign_record
from pretrain.config.slurm import SlurmProfile
from pretrain.lifecycle import RunLock
from pretrain.pipeline import ledger
from pretrain.pipeline.plan import plan
from pretrain.resources import resource
from pretrain.stages import resolve
from pretrain.utils import PretrainError, atomic_write_json, atomic_write_text, redact

TEMPLATES = resource("slurm")
# Stages that split their shards over the tasks of an array job (task/num_tasks from
# SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, pretrain.features.extract.task_split).
ARRAY_STAGES = {"features mfcc", "features model", "kmeans assign"}
SINGLE_STAGES = {"kmeans fit", "kmeans quality", "export hf", "shards verify", "probe"}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Job:
    """A rendered submission: where its files go and what the script says."""

    stage: str
    tag: str
    job_dir: Path
    script: str
    config_yaml: str
    record: dict
    config_path: Path
    """Where the config snapshot the job runs is written."""
    extra_files: dict = field(default_factory=dict)
    """More files the job needs (path -> text): a training job's profile snapshot, with which
    it submits its probe jobs (``probe.every``)."""

    @property
    def script_path(self) -> Path:
        return self.job_dir / f"{self.tag}.sbatch"


def render(template: str, values: dict[str, Any]) -> str:
    """Fill ``{{name}}`` placeholders; a placeholder without a value is an error (a template
    and the code that fills it must agree)."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise PretrainError(f"sbatch template needs values for {', '.join(missing)}")
    text = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)
    # Empty optional blocks leave blank lines; keep the script tidy.
    return re.sub(r"\n{3,}", "\n\n", text)


def load_profile(path: str | None, overrides: Sequence[str] = ()) -> SlurmProfile:
    return load_config(SlurmProfile, [path] if path else [], list(overrides))


def _stage_name(stage) -> str:
    return stage.group if stage.name is None else f"{stage.group} {stage.name}"


def default_job_dir(stage_name: str, cfg: Any) -> Path:
    if stage_name == "train":
        return Path(cfg.run_dir) / "slurm"
    if stage_name == "kmeans assign":
        return Path(cfg.shards) / "labels" / cfg.name / "slurm"
    if hasattr(cfg, "out"):
        return Path(cfg.out) / "slurm"
    raise PretrainError(f"give --job-dir for stage '{stage_name}'")


def _directives(profile: SlurmProfile, train: bool) -> list[str]:
    lines = []
    for option, value in (("partition", profile.partition), ("account", profile.account),
                          ("qos", profile.qos), ("constraint", profile.constraint)):
        if value:
            lines.append(f"--{option}={value}")
    gpus = profile.gpus_per_node if train else profile.offline_gpus
    if gpus:
        lines.append(f"--gpus-per-node={gpus}" if train else f"--gpus={gpus}")
    mem = profile.mem if train else profile.offline_mem
    if mem:
        lines.append(f"--mem={mem}")
    lines.extend(profile.extra_sbatch)
    return [f"#SBATCH {line}" for line in lines]


def prepare(argv: Sequence[str], profile: SlurmProfile, job_dir: str | None = None,
            tasks: int | None = None, launch_argv: Sequence[str] = (), dry_run: bool = False) -> list[Job]:
    """Resolve a ``pretrain`` command line (config checked here, before anything is submitted)
    and render its job; ``iterate`` renders one job per stage that is not done."""
    argv = list(argv[1:] if argv[:1] == ["pretrain"] else argv)
    stage, cfg, args, _ = resolve(argv)
    name = _stage_name(stage)
    if name == "iterate":
        return _prepare_iterate(cfg, profile, job_dir, tasks, argv, launch_argv, dry_run)
    if name not in ARRAY_STAGES | SINGLE_STAGES | {"train"}:
        raise PretrainError(f"launch slurm runs train, iterate, {', '.join(sorted(ARRAY_STAGES | SINGLE_STAGES))}; "
                            f"not '{name}'")
    folder = (Path(job_dir) if job_dir else default_job_dir(name, cfg)).resolve()
    tag = f"{name.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    kind = "train" if name == "train" else ("array" if name in ARRAY_STAGES else "single")
    return [_render(kind, name, [*name.split(), "--config", str(folder / f"{tag}.config.yaml")], to_yaml(cfg),
                    folder, tag, profile, tasks, ["pretrain", *argv], launch_argv)]


def _prepare_iterate(cfg, profile: SlurmProfile, job_dir: str | None, tasks: int | None, argv: list[str],
                     launch_argv: Sequence[str], dry_run: bool) -> list[Job]:
    """The stages of ``pretrain iterate`` that are not done, as a chain of jobs that each run
    ``pretrain iterate --config SNAPSHOT --only STAGE`` (the same bookkeeping as a local run:
    fingerprints, invalidation, resume)."""
    folder = (Path(job_dir) if job_dir else Path(cfg.run_dir) / "slurm").resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    snapshot = folder / f"iterate-{stamp}.config.yaml"
    if not dry_run:
        refuse_foreign_record(cfg.run_dir)
    stages = plan(cfg, create_identity=not dry_run)
    if not dry_run:  # invalidation deletes: not while a local `pretrain iterate` works in the run

        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        RunLock(cfg.run_dir, "launch slurm iterate").acquire()  # held until this command exits
        # What `pretrain status` reads, from the chain's first minute (a local iterate writes the
        # same at its start).

        write_run_record(cfg.run_dir, cfg, ["launch", "slurm", *argv])
        (Path(cfg.run_dir) / ledger.STAGES_DIR).mkdir(exist_ok=True)
    ledger.invalidate_changed(cfg.run_dir, stages, delete=not dry_run)
    states = ledger.status(cfg.run_dir, stages)
    jobs = []
    for stage in stages:
        if states[stage.name] == "done":
            continue
        kind = "train" if stage.train else ("array" if stage.array else "single")
        command = ["iterate", "--config", str(snapshot), "--only", stage.name]
        jobs.append(_render(kind, f"iterate {stage.name}", command, to_yaml(cfg), folder, f"{stage.name}-{stamp}",
                            profile, tasks, ["pretrain", *argv], launch_argv, config_path=snapshot))
    if not jobs:
        raise PretrainError(f"every stage of {cfg.run_dir} is done; nothing to submit")
    return jobs


def check_job_dir(folder: Path) -> None:
    """SLURM expands ``%`` in ``--output`` (``%j`` is the job id) and a ``#SBATCH`` line cannot
    hold a double quote or a line break: refuse such a job folder, saying why (spaces are fine,
    the path is quoted)."""
    bad = [c for c in ('%', '"', "\n", "\\") if c in str(folder)]
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise PretrainError(f"job folder {str(folder)!r} contains {shown}: SLURM expands '%' in log paths and "
                            "#SBATCH lines cannot carry quotes, backslashes or line breaks; choose a run directory "
                            "(or --job-dir) without them")


HOLD_USR1 = ["env", "--block-signal=USR1"]
"""Prefix of a training task's command: SIGUSR1 held back (blocked, so that it waits, pending,
across exec) until the trainer has its handler and lets it through (``pretrain.lifecycle``).
SLURM signals every process of the step, and a Python still starting up (0.1-0.2 s) died of it:
a preemption right after a requeued job restarted ended it FAILED. GNU env (coreutils 8.31 and
later) because a shell cannot block a signal, only ignore it, and an ignored one is lost."""


def _render(kind: str, name: str, command_argv: list[str], config_yaml: str, folder: Path, tag: str,
            profile: SlurmProfile, tasks: int | None, command: list[str], launch_argv: Sequence[str],
            config_path: Path | None = None) -> Job:
    """One job; ``config_path`` is the snapshot it runs (default: ``<tag>.config.yaml``; the
    jobs of an iterate chain share one)."""
    check_job_dir(folder)
    python = profile.python or sys.executable
    words = [*(HOLD_USR1 if kind == "train" else []), python, "-m", "pretrain.cli", *command_argv, "--no-progress"]
    setup = "\n".join(profile.setup)
    extra = {}
    if kind == "train":
        # A training run submits a probe job per probed checkpoint (probe.every) with the
        # profile it was launched with.
        profile_path = folder / f"{tag}.profile.yaml"
        extra[profile_path] = to_yaml(profile)
        setup = f"export PRETRAIN_SLURM_PROFILE={shlex.quote(str(profile_path))}\n{setup}"
    common = {"job_name": f"pretrain-{name.split()[-1]}", "setup": setup,
              "command": " ".join(shlex.quote(w) for w in words), "signal_seconds": profile.signal_seconds,
              "profile_directives": "\n".join(_directives(profile, kind == "train"))}
    if kind == "train":
        script = render((TEMPLATES / "train.sbatch").read_text(), {
            **common, "nodes": profile.nodes, "tasks_per_node": profile.tasks,
            "cpus_per_task": profile.cpus_per_task, "time": profile.time,
            "log": folder / f"{tag}-%j.out"})
        shape = {"nodes": profile.nodes, "tasks_per_node": profile.tasks}
    else:
        n = (tasks or profile.array_tasks) if kind == "array" else 1
        array = ""
        if n > 1:
            array = f"#SBATCH --array=0-{n - 1}" + (f"%{profile.array_parallel}" if profile.array_parallel else "")
        log = folder / (f"{tag}-%A_%a.out" if n > 1 else f"{tag}-%j.out")
        script = render((TEMPLATES / "job.sbatch").read_text(), {
            **common, "stage": name, "cpus": profile.offline_cpus, "time": profile.offline_time,
            "log": log, "max_requeues": profile.max_requeues,
            "tasks_note": f"an array of {n} tasks, each taking every {n}th shard" if n > 1 else "one task",
            "profile_directives": "\n".join([array] * bool(array) + _directives(profile, False))})
        shape = {"array_tasks": n}
    record = {"stage": name, "command": command, "launch_command": list(launch_argv),
              "pretrain_version": __version__, "git_commit": git_commit(),
              "profile": {k: v for k, v in vars(profile).items()}, "shape": shape,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Job(name, tag, folder, script, config_yaml, record, config_path or folder / f"{tag}.config.yaml", extra)


def submit(job: Job, after: Sequence[str] = ()) -> str:
    """Write the job's files and ``sbatch`` it (after the jobs in ``after`` succeed); returns
    the job id."""
    job.job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.config_path, job.config_yaml)
    for path, text in job.extra_files.items():
        atomic_write_text(path, text)
        if redact(text) != text:  # the profile snapshot probe jobs are submitted with
            Path(path).chmod(0o600)
    atomic_write_text(job.script_path, job.script)
    if redact(job.script) != job.script:  # what runs needs the credential; only its owner reads it
        job.script_path.chmod(0o600)
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd.append("--dependency=afterok:" + ":".join(after))
    cmd.append(str(job.script_path))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=job.job_dir)
    except FileNotFoundError:
        raise PretrainError("sbatch not found: is this a SLURM login node? (slurm/local-cluster.sh "
                            "starts a local test cluster)") from None
    if proc.returncode != 0:
        raise PretrainError(f"sbatch {job.script_path} failed: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    atomic_write_json(job.job_dir / f"{job.tag}.launch.json", redact({**job.record, "job_id": job_id,
                                                                      "after": list(after)}))
    return job_id


def main(args) -> int:
    """``launch slurm`` (parsed by launch.cli)."""
    profile = load_profile(args.profile, args.profile_overrides or [])
    commands = [shlex.split(s) for s in args.stage] if args.stage else [args.command]
    if not commands or not commands[0]:
        raise PretrainError("give a pretrain command, e.g. launch slurm --profile P train --config C")
    jobs = [job for c in commands for job in prepare(c, profile, args.job_dir if len(commands) == 1 else None,
                                                     args.tasks, ["launch", "slurm", *args.raw], args.dry_run)]
    if args.dry_run:
        for job in jobs:
            print(f"# {job.stage}: would write {job.script_path}")
            print(redact(job.script))
        return 0
    after = list(args.after or [])
    for job in jobs:
        job_id = submit(job, after)
        print(f"{job_id}\t{job.stage}\t{job.script_path}", flush=True)
        after = [job_id]  # a chain: each stage waits for the previous one to succeed
    # (``iterate``: a stage's record is written by its job, so a resubmission after a failure
    # submits only what is still not done.)
    return 0
