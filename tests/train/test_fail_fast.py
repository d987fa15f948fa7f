"""Any error on any rank ends the whole job at once, with the error last (issue: "The main job
never breaks or hangs"). Real 2-process DeepSpeed jobs through ``launch local``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pretrain.lifecycle import RunLock
from tests.data.test_shards import flip_flac_magic

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(sys.executable).parent / "launch"


def _running_with(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the run directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (Path("/proc") / pid / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{pid}: {cmd}")
    return found


def failing_job(run_dir: Path, shards: Path, *overrides: str, fault: dict | None = None) -> tuple[int, str, float]:
    """Run a 2-process job that fails; returns (exit status, its output, seconds from the
    first "error on rank" line to the end of every process of the job)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("PRETRAIN_FAULT", None)
    if fault:
        env["PRETRAIN_FAULT"] = json.dumps(fault)
    cmd = [str(LAUNCH), "local", "--nproc", "2", "pretrain", "train",
           "--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
           "--run-dir", str(run_dir), f"data.shards={shards}", "log.every=1", "optim.max_steps=8",
           "optim.warmup_steps=1", "checkpoint.every=2", "data.max_tokens=40000", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    first_error: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "error on rank" in line and not first_error:
                first_error.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the job was still running after 300 s:\n" + "".join(lines[-40:]))
    reader.join(10)
    deadline = time.monotonic() + 60
    while _running_with(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _running_with(str(run_dir))
    assert not left, f"still running after the launcher ended: {left}"
    assert first_error, "no rank reported an error:\n" + "".join(lines[-40:])
    return proc.returncode, "".join(lines), time.monotonic() - first_error[0]


def check_failed(run: Path, code: int, output: str, seconds: float, *said: str) -> None:
    assert code != 0
    assert seconds <= 60, f"the job took {seconds:.0f} s to end after the error"
    last = output.strip().splitlines()[-1]
    assert last.startswith("launch local: the job failed: rank "), output[-3000:]
    for text in said:
        assert text in last, last
    assert RunLock(run, "test").held_by() is None


def test_a_bad_audio_member_ends_every_rank(small_shards, tmp_path):
    shards = Path(shutil.copytree(small_shards, tmp_path / "s"))
    key = flip_flac_magic(shards / "shard-000005.tar", which=2)
    run = tmp_path / "run"
    # Enough steps to read every shard (the error ends the job long before).
    code, output, seconds = failing_job(run, shards, "data.on_error=raise", "data.num_workers=1",
                                        "optim.max_steps=200")
    check_failed(run, code, output, seconds, "DataError: shard shard-000005.tar", f"key '{key}'", "audio does not decode")


@pytest.mark.parametrize("where, rank", [("forward", 1), ("save", 1), ("probe", 0)])
def test_an_error_on_one_rank_ends_the_job_and_a_rerun_resumes(small_shards, tmp_path, where, rank):
    run = tmp_path / "run"
    code, output, seconds = failing_job(run, small_shards, fault={"raise_at": 4, "rank": rank, "where": where})
    check_failed(run, code, output, seconds, f"rank {rank} ", "test fault")
    if where == "forward":
        # A rerun resumes from the last checkpoint (step 2) and finishes.
        from tests.train.test_train import launch

        proc = launch(run, small_shards, "optim.max_steps=8", "optim.warmup_steps=1", "checkpoint.every=2")
        assert "resumed from step 2" in proc.stderr


def test_a_stalled_rank_leaves_its_stacks_and_ends_the_job(small_shards, tmp_path):
    run = tmp_path / "run"
    code, output, seconds = failing_job(run, small_shards, "stall_timeout=8", fault={"stall_at": 3, "rank": 1})
    check_failed(run, code, output, seconds, "no training step completed in", "stall_timeout=8", "stacks")
    stacks = (run / "stacks/rank_1.txt").read_text()
    assert "no training step completed" in stacks and "in _train" in stacks and "Thread" in stacks


def test_every_rank_failing_at_once_is_one_line_from_the_launcher(small_shards, tmp_path):
    """Both ranks meet the same bad input in the same instant: the launcher stops the second
    while it writes its error file, and reads that file; it must still name the cause (a
    half-written file made torchrun die on a JSONDecodeError instead)."""
    run = tmp_path / "run"
    code, output, seconds = failing_job(run, small_shards, "data.labels=[no_such_set]")
    check_failed(run, code, output, seconds, "label set 'no_such_set' not found")
