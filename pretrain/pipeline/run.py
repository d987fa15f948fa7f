"""Running an ``iterate`` run: ``iterate`` plans the stages, invalidates what changed, and
runs every stage that is not done, in order, locally (each a subprocess; training through
``launch local --nproc``); under SLURM (``launch slurm iterate``) each stage is a job running
``pretrain iterate --only NAME``, chained with ``afterok``. Both go through ``run_stage``,
which opens and closes the stage's record. ``report.md`` is rewritten at the end (under SLURM,
by the job that completes the chain).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pretrain.config import write_run_record
from pretrain.config.core import refuse_foreign_record
from pretrain.config.iterate import IterateConfig
from pretrain.distributed import read_env
from pretrain.lifecycle import LAUNCHER_ENV, RunLock
from pretrain.pipeline.dashboard import publish
from pretrain.pipeline.ledger import (changed_fields, finish_record, invalidate_changed, read_record, start_record,
                                      status, unchanged)
from pretrain.pipeline.plan import PlannedStage, plan
from pretrain.pipeline.report import write_report
from pretrain.stages import execute
from pretrain.utils import PretrainError, redact

log = logging.getLogger(__name__)


def stage_env(stage: PlannedStage, child: bool = True) -> dict:
    env = dict(os.environ)
    if child:
        env[LAUNCHER_ENV] = str(os.getpid())  # a stage dies with the iterate that started it
    else:
        env.pop(LAUNCHER_ENV, None)
    # Test-only fault injection reaches one chosen stage (see tests/pipeline/test_iterate.py).
    only = env.pop("PRETRAIN_FAULT_STAGE", None)
    if only != stage.name:
        env.pop("PRETRAIN_FAULT", None)
    return env


def run_stage(cfg: IterateConfig, stage: PlannedStage, in_process: bool = False, progress: bool = True) -> None:
    """Run one stage: locally as a subprocess, or (``in_process``, a SLURM job or array task)
    in this process; ``progress=False`` (``iterate --no-progress``) reaches the stage too."""
    run = Path(cfg.run_dir)
    main_rank = read_env().rank == 0
    if main_rank:
        start_record(run, stage)
    started = time.monotonic()
    if in_process:
        # Built from the environment before it is replaced: the job's rank, array task, PATH and
        # the profile's exports must all reach the stage (clearing first lost every one).
        env = stage_env(stage, child=False)
        os.environ.clear()
        os.environ.update(env)
        code = execute([*stage.argv, "--no-progress"])  # training exits inside (engine.shutdown)
    else:
        quiet = [] if progress else ["--no-progress"]
        if stage.train:
            cmd = [str(Path(sys.executable).parent / "launch"), "local", "--nproc", str(cfg.nproc), "pretrain",
                   *stage.argv, *quiet]
        else:
            cmd = [sys.executable, "-m", "pretrain.cli", *stage.argv, *quiet]
        log.info("stage %s: %s", stage.name, " ".join(cmd))
        code = subprocess.run(cmd, env=stage_env(stage)).returncode
    if code != 0:
        raise PretrainError(f"stage {stage.name} failed (exit status {code}); rerun the same command to "
                            "resume it")
    if stage.done():
        if main_rank:
            finish_record(run, stage, time.monotonic() - started)
    elif not (in_process and stage.array):  # an array task may finish before its siblings
        raise PretrainError(f"stage {stage.name} ended without finishing ({stage.done_mark} missing or "
                            "incomplete); rerun the same command to resume it")


def command(cfg: IterateConfig, argv: list[str], progress: bool) -> int:
    """``pretrain iterate`` (registered in ``pretrain.stages`` by name)."""
    return iterate(cfg, argv, progress)


def dry_run(cfg: IterateConfig) -> str:
    """The plan of ``cfg`` against what ``run_dir`` holds, a line per stage: ``done``, ``run``
    (never run, or unfinished) or ``rerun`` with the reason, as ``iterate`` would decide it.
    Reads only."""
    run = Path(cfg.run_dir)
    stages = plan(cfg, create_identity=False)
    current = unchanged(run, stages)
    todo: set[str] = set()
    lines = []
    width = max(len(s.name) for s in stages)
    for stage in stages:
        record = read_record(run, stage.name)
        upstream = [u for u in stage.upstream if u in todo]
        if record is not None and current[stage.name] is None:
            fields = changed_fields(record.get("config", {}), redact(stage.config))
            why = (f"rerun: its config changed ({'; '.join(fields[:6])})" if fields
                   else f"rerun: upstream {', '.join(upstream) or 'stages'} changed")
        elif upstream:
            why = f"{'rerun' if record else 'run'}: upstream {', '.join(upstream)} will run"
        elif current[stage.name] is not None and stage.done():
            why = "done"
        elif record is not None:
            why = f"run: unfinished ({len(record.get('attempts', []))} attempts so far)"
        else:
            why = "run: never run"
        if why != "done":
            todo.add(stage.name)
        lines.append(f"  {stage.name:<{width}}  {why}")
    head = f"{run}: dry run, nothing was run, written or deleted"
    tail = f"{len(todo)} of {len(stages)} stages would run; {len(stages) - len(todo)} are done"
    return "\n".join([head, *lines, tail])


def iterate(cfg: IterateConfig, argv: list[str] | None = None, progress: bool = True) -> int:
    only = cfg.only
    run = Path(cfg.run_dir)
    refuse_foreign_record(run)
    if cfg.dry_run:
        print(dry_run(cfg))
        return 0
    run.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg)
    names = [s.name for s in stages]
    if only is not None:
        if only not in names:
            raise PretrainError(f"no stage '{only}' in this run; stages: {', '.join(names)}")
        stage = next(s for s in stages if s.name == only)
        if status(run, [stage])[only] == "done":
            log.info("stage %s: done already, nothing to do", only)
            return 0
        run_stage(cfg, stage, in_process=True)
        # Under SLURM each stage is a job: the one that completes the chain writes the report
        # (training stages exit inside, so the chain never ends with one: probes follow it).
        if read_env().rank == 0 and all(state == "done" for state in status(run, stages).values()):
            log.info("every stage is done; report: %s", write_report(cfg, stages))
            publish(run, len(cfg.iterations))
        return 0
    lock = RunLock(run, "pretrain iterate").acquire()
    write_run_record(run, cfg, argv)
    invalidate_changed(run, stages)
    states = status(run, stages)
    started = time.monotonic()
    ran = []
    for stage in stages:
        if states[stage.name] == "done":
            log.info("stage %s: done, skipped", stage.name)
            continue
        log.info("stage %s: running", stage.name)
        run_stage(cfg, stage, progress=progress)
        ran.append(stage.name)
    report = write_report(cfg, stages)
    publish(run, len(cfg.iterations))
    print(f"{len(ran)} stages run ({', '.join(ran) or 'none: everything was done'}), "
          f"{len(stages) - len(ran)} skipped, in {time.monotonic() - started:.0f} s; report: {report}")
    lock.release()
    return 0
