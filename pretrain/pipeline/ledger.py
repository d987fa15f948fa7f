"""The ledger of an ``iterate`` run: its stage records, their fingerprints, what changed and
must be redone, and the run's identity. ``pretrain.pipeline.plan`` says what the stages are;
this module says which of them are done; ``status`` and ``run`` read it through the public
functions here.

Records, in ``run_dir/stages/<name>.json``: the stage's fingerprint, its resolved config (paths
inside the run written as ``${run_dir}/...``), its command line and outputs, and one entry per
attempt (start, seconds). A stage's *fingerprint* is the sha256 of its config and of its
upstream stages' fingerprints. A stage is *done* when its record's fingerprint is today's and
its outputs are complete (its completion mark).

Upgrading never invalidates a finished run. One rule reads every older record: a record
whose fingerprint is not today's still describes this stage when its config differs from
today's only by fields it lacks that hold their default now (fields added since it was
written), or that it has and today's schema no longer does (fields removed since), and its
upstream stages are unchanged too; records written with absolute paths (before
``${run_dir}``) are read relative to where their outputs were. Such a record is rewritten in
today's form. Any other difference invalidates the stage and everything downstream
(``invalidate_changed``). ``tests/pipeline/test_ledger.py`` holds records written by earlier
versions (``tests/assets/golden_run``) that must keep reading as unchanged.

Identity: ``stages/identity.json`` holds the run's id and where it was created. Label sets of a
run whose shards live outside it (``corpus.shards``) carry the id in their name
(``it2_km500-<id>``), so runs sharing a shard directory never overwrite each other's labels.
A run found at a new path whose old path still holds the same id is a copy and gets an id of
its own (its external label sets are then made afresh); one whose old path is gone was moved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Protocol

from pretrain.utils import PretrainError, atomic_write_json, redact

log = logging.getLogger(__name__)

STAGES_DIR = "stages"
IDENTITY = "identity.json"
RUN_DIR = "${run_dir}"
"""How the run directory is written in fingerprints and records."""


class Stage(Protocol):
    """What the ledger needs of a planned stage (``pretrain.pipeline.plan.PlannedStage``)."""

    name: str
    argv: list[str]
    outputs: list[Path]
    upstream: list[str]
    config: dict
    """Resolved, without the fields that do not change results, paths relative to the run."""
    defaults: dict
    """The same for the schema's defaults: what a field absent from an old record meant."""
    fingerprint: str

    def done(self) -> bool: ...


def fingerprint(stages: list[Stage]) -> None:
    """Set each stage's fingerprint (stages in order, upstream ones first)."""
    prints: dict[str, str] = {}
    for stage in stages:
        h = hashlib.sha256(json.dumps(stage.config, sort_keys=True).encode())
        for up in stage.upstream:
            h.update(prints[up].encode())
        stage.fingerprint = prints[stage.name] = h.hexdigest()


def _same(recorded, now, default) -> bool:
    """Whether a recorded config section describes today's: equal but for fields the record
    lacks that are at their default now, and fields today's schema no longer has."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        default = default if isinstance(default, dict) else {}
        for key, value in now.items():
            if key not in recorded:
                if key not in default or value != default[key]:
                    return False
            elif not _same(recorded[key], value, default.get(key)):
                return False
        return True
    return recorded == now


def _recorded_config(record: dict, stage: Stage, run: Path) -> dict:
    """The record's config with paths relative to the run, also for records written with
    absolute paths: their root is read off the recorded output path."""
    config, outputs = record.get("config", {}), record.get("outputs") or []
    if outputs and stage.outputs and not outputs[0].startswith(RUN_DIR):
        tail = os.path.relpath(str(stage.outputs[0]), str(run))
        if not tail.startswith("..") and outputs[0].endswith(os.sep + tail):
            config = relative(config, outputs[0][:-len(tail) - 1])
    return config


def unchanged(run: Path, stages: list[Stage]) -> dict[str, dict | None]:
    """Each stage's record if it still describes the stage (today's fingerprint, or the rule of
    the module docstring), else None (no record, or a changed stage or upstream)."""
    run = Path(run).resolve()
    out: dict[str, dict | None] = {}
    for stage in stages:
        record = read_record(run, stage.name)
        if record is not None and record.get("fingerprint") != stage.fingerprint:
            ups_ok = all(out.get(u) is not None for u in stage.upstream)
            # Records hold redacted configs (credentials never enter them): compared as such.
            same = _same(_recorded_config(record, stage, run), redact(stage.config), redact(stage.defaults))
            if not (ups_ok and same):
                record = None
            else:
                record = {**record, "fingerprint": stage.fingerprint, "config": redact(stage.config),
                          "outputs": [relative(str(p), str(run)) for p in stage.outputs]}
        out[stage.name] = record
    return out


def run_identity(run: Path, create: bool = True) -> str:
    """This run's id (see the module docstring); ``create=False`` (a dry run) writes nothing.

    A run directory made before ids existed (stage records but no identity) keeps the empty
    id, and so its label set names."""
    run = run.resolve()
    path = run / STAGES_DIR / IDENTITY
    if path.is_file():
        identity = json.loads(path.read_text())
        if identity["path"] == str(run):
            return identity["run_id"]
        old = Path(identity["path"]) / STAGES_DIR / IDENTITY
        try:
            copied = json.loads(old.read_text())["run_id"] == identity["run_id"]
        except (OSError, ValueError, KeyError):
            copied = False
        if not copied:  # moved: the same run
            log.info("run directory moved from %s to %s", identity["path"], run)
            if create:
                atomic_write_json(path, {**identity, "path": str(run)})
            return identity["run_id"]
        log.warning("run directory %s is a copy of %s: it is a run of its own from here on (new id)",
                    run, identity["path"])
        fresh = {"run_id": secrets.token_hex(4), "path": str(run), "copied_from": identity["path"]}
    elif (run / STAGES_DIR).is_dir() and any((run / STAGES_DIR).glob("*.json")):
        fresh = {"run_id": "", "path": str(run), "note": "made before run ids: label sets keep their names"}
    else:
        fresh = {"run_id": secrets.token_hex(4), "path": str(run)}
    if create:
        atomic_write_json(path, {**fresh, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return fresh["run_id"]


def inside(path: Path, run: Path) -> bool:
    return path.resolve().is_relative_to(run.resolve())


def relative(value, run: str):
    """``value`` with every path inside ``run`` written as ``${run_dir}/...``."""
    if isinstance(value, dict):
        return {k: relative(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v, run) for v in value]
    if isinstance(value, str) and (value == run or value.startswith(run + os.sep)):
        return RUN_DIR + value[len(run):]
    return value


def absolute(path: str, run: Path) -> Path:
    return run / path[len(RUN_DIR) + 1:] if path.startswith(RUN_DIR) else Path(path)


def record_path(run: Path, name: str) -> Path:
    return run / STAGES_DIR / f"{name}.json"


def read_record(run: Path, name: str) -> dict | None:
    path = record_path(run, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        # Records are written atomically; a damaged one was cut or edited by something else.
        raise PretrainError(f"stage record {path} is damaged ({e}); delete it to have stage {name} redone") from None
    if not isinstance(record, dict) or not isinstance(record.get("attempts"), list):
        raise PretrainError(f"stage record {path} is not a stage record (no list of attempts); delete it to "
                            f"have stage {name} redone")
    return record


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def owned(path: Path, run: Path, run_id: str) -> bool:
    """Whether invalidation may delete ``path``: inside the run directory, or a label set
    named with this run's id."""
    if inside(path, run):
        return True
    return bool(run_id) and path.parent.name == "labels" and path.name.endswith(f"-{run_id}")


def downstream(stages: list[Stage], name: str) -> list[str]:
    out: list[str] = []
    for stage in stages:
        if any(u == name or u in out for u in stage.upstream):
            out.append(stage.name)
    return out


def start_record(run: Path, stage: Stage) -> None:
    record = read_record(run, stage.name)
    if record is None or record["fingerprint"] != stage.fingerprint:
        record = {"name": stage.name, "fingerprint": stage.fingerprint, "config": redact(stage.config),
                  "argv": redact(["pretrain", *stage.argv]),
                  "outputs": [relative(str(p), str(run.resolve())) for p in stage.outputs], "attempts": []}
    record["attempts"].append({"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    atomic_write_json(record_path(run, stage.name), record)


def finish_record(run: Path, stage: Stage, seconds: float) -> None:
    record = read_record(run, stage.name)
    record["attempts"][-1]["seconds"] = round(seconds, 1)
    record["seconds"] = round(sum(a.get("seconds", 0.0) for a in record["attempts"]), 1)
    atomic_write_json(record_path(run, stage.name), record)


def invalidate_changed(run_dir: str | Path, stages: list[Stage], delete: bool = True) -> list[str]:
    """Delete the outputs and records of every stage whose config changed, and of everything
    downstream of it; returns their names (and logs why). Records of unchanged stages written
    by an earlier version are rewritten in today's form. ``delete=False`` only reports (a dry
    run). Nothing outside the run directory is deleted but a label set this run owns."""
    run = Path(run_dir)
    current = unchanged(run, stages)
    stale: list[str] = []
    run_id = run_identity(run, create=False) if (run / STAGES_DIR / IDENTITY).is_file() else ""
    for stage in stages:
        record = read_record(run, stage.name)
        if any(u in stale for u in stage.upstream):
            stale.append(stage.name)
        elif record is None:
            continue
        elif current[stage.name] is None:
            fields = changed_fields(record.get("config", {}), redact(stage.config)) or ["an upstream stage's output"]
            log.warning("stage %s: its config changed (%s); invalidating it and everything downstream: %s",
                        stage.name, "; ".join(fields[:8]), ", ".join(downstream(stages, stage.name)) or "nothing")
            stale.append(stage.name)
        elif current[stage.name]["fingerprint"] != record.get("fingerprint") and delete:
            log.info("stage %s: record written by an earlier version, same config: kept", stage.name)
            atomic_write_json(record_path(run, stage.name), current[stage.name])
    for name in stale if delete else ():
        stage = next(s for s in stages if s.name == name)
        record = read_record(run, name) or {}
        # The outputs the stage wrote under its old config too (a label set named by k, ...).
        for path in {*stage.outputs, *(absolute(p, run.resolve()) for p in record.get("outputs", []))}:
            if not owned(path, run, run_id):
                log.warning("stage %s: not deleting %s: it is outside the run directory %s and not a "
                            "label set of this run", name, path, run)
                continue
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        record_path(run, name).unlink(missing_ok=True)
    return stale


def status(run_dir: str | Path, stages: list[Stage]) -> dict[str, str]:
    """done / pending for every stage (after invalidation)."""
    current = unchanged(Path(run_dir), stages)
    return {s.name: "done" if current[s.name] is not None and s.done() else "pending" for s in stages}


