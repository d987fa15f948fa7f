"""``pretrain status RUN_DIR``: where a run is, from its own files (and SLURM, when it was
submitted there), without changing anything.

For an ``iterate`` run directory: every stage's state, attempts, wall time and SLURM job; the
training progress of each iteration (step, loss, masked accuracy, audio-s/s, an ETA from the
recent step time); the newest checkpoint; label quality per iteration. For a ``train`` run
directory: the training part alone. ``--json`` prints the same as one JSON object.

Stage states: ``done`` (finished, and its config unchanged), ``running`` (an attempt is open
and the run's lock is held, or its SLURM job is pending or running), ``stalled`` (a running
training whose last logged step is older than several logging intervals), ``failed`` (an attempt
is open, but nothing holds the run or runs its job), ``stale`` (its config changed since it ran:
the next ``iterate`` redoes it and what follows), ``pending`` (never started).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from omegaconf import OmegaConf

from pretrain.config import load_config, quote_override
from pretrain.config.iterate import IterateConfig
from pretrain.lifecycle import RunLock
from pretrain.pipeline.ledger import read_record, status, unchanged
from pretrain.pipeline.plan import plan
from pretrain.train.metrics import read_jsonl
from pretrain.utils import PretrainError

_ACTIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED"}


def _lock_holder(folder: Path) -> dict | None:
    return RunLock(folder, "").held_by()


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job (``squeue``, then ``sacct`` for finished ones); empty where
    SLURM is not reachable."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    for cmd in (["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in proc.stdout.splitlines():
            parts = line.replace("|", " ").split()
            if len(parts) >= 2:
                states.setdefault(parts[0].split("_")[0], parts[1])
    return states


def _slurm_jobs(run: Path) -> dict[str, dict]:
    """The newest submitted job of each ``iterate`` stage, from ``slurm/*.launch.json``."""
    jobs: dict[str, dict] = {}
    for path in sorted((run / "slurm").glob("*.launch.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stage = record.get("stage", "")
        if stage.startswith("iterate ") and record.get("job_id"):
            jobs[stage.removeprefix("iterate ")] = {"job_id": record["job_id"], "submitted": record.get("time_utc")}
    return jobs


def training(train_dir: Path) -> dict | None:
    """Progress of the training in ``train_dir``: step, loss, accuracy, speed, ETA, newest
    checkpoint."""
    metrics_path = train_dir / "metrics.jsonl"
    if not train_dir.is_dir():
        return None
    out: dict = {"dir": str(train_dir)}
    log_every = 1
    try:
        saved = OmegaConf.load(train_dir / "config.yaml")
        out["max_steps"] = int(saved.optim.max_steps)
        log_every = int(OmegaConf.select(saved, "log.every", default=1))
    except Exception:  # a run that never started has no config; the status still shows the rest
        out["max_steps"] = None
    rows = [r for r in read_jsonl(metrics_path) if "loss" in r] if metrics_path.is_file() else []
    if rows:
        last = rows[-1]
        out.update(step=last["step"], loss=last["loss"], acc_masked=last.get("acc_masked"),
                   audio_s_per_s=last.get("audio_s_per_s"), step_time_s=last.get("step_time_s"),
                   updated_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(metrics_path.stat().st_mtime)))
        if out["max_steps"] and last.get("step_time_s"):
            out["eta_s"] = max(0, out["max_steps"] - last["step"]) * last["step_time_s"]
    latest = train_dir / "checkpoints" / "latest"
    out["checkpoint"] = latest.read_text().strip() if latest.is_file() else None
    bad = sorted(p.name for p in (train_dir / "checkpoints").glob("step_*.bad*")) \
        if (train_dir / "checkpoints").is_dir() else []
    if bad:
        out["quarantined"] = bad
    holder = _lock_holder(train_dir)
    out["running"] = holder is not None
    if holder:
        out["holder"] = holder
    if rows and holder is not None and last.get("step_time_s"):
        # A line is logged every log.every steps; no line for several of those intervals (a
        # checkpoint save fits in one) while the run still holds its directory means it is stuck.
        interval = log_every * last["step_time_s"]
        age = time.time() - metrics_path.stat().st_mtime
        if age > max(STALLED_INTERVALS * interval, STALLED_MIN_SECONDS):
            out["stalled_s"] = age
    return out


STALLED_INTERVALS = 5
"""A running training run is shown ``stalled`` when its last metrics line is older than this
many logging intervals (``log.every`` x the step time) ..."""
STALLED_MIN_SECONDS = 300
"""... and than this (a checkpoint save or a probe start may hold a step that long)."""


def iterate_status(run: Path) -> dict:
    # The run's own resolved config, at the place the run is now (it may have moved).
    cfg = load_config(IterateConfig, [run / "config.yaml"], [quote_override("run_dir", str(run))])
    stages = plan(cfg, create_identity=False)
    done = status(run, stages)
    current = unchanged(run, stages)
    holder = _lock_holder(run)
    jobs = _slurm_jobs(run)
    slurm = slurm_states([j["job_id"] for j in jobs.values()])
    rows = []
    for stage in stages:
        record = read_record(run, stage.name)
        row = {"name": stage.name, "attempts": len(record["attempts"]) if record else 0,
               "seconds": record.get("seconds") if record else None}
        if stage.name in jobs:
            row["slurm_job"] = jobs[stage.name]["job_id"]
            row["slurm_state"] = slurm.get(row["slurm_job"], "unknown")
        if done[stage.name] == "done":
            row["state"] = "done"
        elif record is None:
            row["state"] = "pending"
        elif current[stage.name] is None:
            row["state"] = "stale"
        else:
            slurm_state = row.get("slurm_state", "").split()
            active = holder is not None or (bool(slurm_state) and slurm_state[0] in _ACTIVE_SLURM)
            row["state"] = "running" if active else "failed"
        rows.append(row)
    trainings = {}
    iterations = []
    for i in range(1, len(cfg.iterations) + 1):
        entry = {"iteration": i, "train": training(run / f"it{i}" / "train")}
        trainings[f"it{i}.train"] = entry["train"]
        for name in ("quality", "heldout", "mfcc_heldout"):
            path = run / f"it{i}" / name / "quality.json"
            if path.is_file():
                entry[f"pnmi_{name}"] = json.loads(path.read_text())["pnmi"]
        iterations.append(entry)
    for row in rows:
        if row["state"] == "running" and (trainings.get(row["name"]) or {}).get("stalled_s"):
            row["state"] = "stalled"
    return {"run_dir": str(run), "kind": "iterate", "running": holder is not None, "holder": holder,
            "stages": rows, "iterations": iterations}


def run_status(run_dir: str | Path) -> dict:
    run = Path(run_dir).resolve()
    if (run / "stages").is_dir() and (run / "config.yaml").is_file():
        return iterate_status(run)
    if (run / "checkpoints").is_dir() or (run / "metrics.jsonl").is_file():
        return {"run_dir": str(run), "kind": "train", "train": training(run)}
    raise PretrainError(f"{run} is neither an iterate run directory (stages/, config.yaml) nor a training "
                        "run directory (checkpoints/, metrics.jsonl)")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _train_line(t: dict | None) -> str:
    if not t or "step" not in t:
        return "not started"
    parts = [f"step {t['step']}/{t['max_steps'] or '?'}", f"loss {t['loss']:.3f}"]
    if t.get("acc_masked") is not None:
        parts.append(f"masked acc {t['acc_masked']:.3f}")
    if t.get("audio_s_per_s") is not None:
        parts.append(f"{t['audio_s_per_s']:.0f} audio-s/s")
    if t.get("stalled_s") is not None:
        parts.append(f"STALLED: no step logged for {_duration(t['stalled_s'])}")
    elif t.get("eta_s") is not None and t["step"] < (t["max_steps"] or 0):
        parts.append(f"ETA {_duration(t['eta_s'])}" + ("" if t.get("running") else " (when resumed)"))
    parts.append(f"checkpoint {t.get('checkpoint') or '-'}")
    if t.get("quarantined"):
        parts.append(f"quarantined {', '.join(t['quarantined'])}")
    return ", ".join(parts)


def format_status(s: dict) -> str:
    if s["kind"] == "train":
        t = s["train"]
        state = ("stalled" if t.get("stalled_s") else "running") if t and t.get("running") else "not running"
        return f"{s['run_dir']} (train, {state}): {_train_line(t)}\n"
    lines = [f"{s['run_dir']} (iterate): " + (f"running, held by {RunLock.describe(s['holder'])}" if s["running"]
                                              else "not running")]
    lines += ["", f"{'stage':<18} {'state':<8} {'attempts':>8} {'wall':>8}  slurm"]
    for row in s["stages"]:
        job = f"{row['slurm_job']} {row['slurm_state']}" if "slurm_job" in row else ""
        lines.append(f"{row['name']:<18} {row['state']:<8} {row['attempts']:>8} {_duration(row['seconds']):>8}  {job}")
    lines.append("")
    for entry in s["iterations"]:
        quality = ", ".join(f"{k.removeprefix('pnmi_')} PNMI {v:.3f}" for k, v in entry.items() if k.startswith("pnmi_"))
        lines.append(f"it{entry['iteration']}: {_train_line(entry['train'])}" + (f"; labels: {quality}" if quality else ""))
    return "\n".join(lines) + "\n"


def command(cfg, argv: list[str], progress: bool) -> int:
    """``pretrain status`` (registered in ``pretrain.stages``)."""
    status = run_status(cfg.run_dir)
    print(json.dumps(status, indent=2) if cfg.json else format_status(status), end="\n" if cfg.json else "")
    return 0
