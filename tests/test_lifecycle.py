"""The run lock, dying with the launcher, and the stop signals (SIGUSR1 before the heavy
imports, SIGTERM mid-training), with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.lifecycle import RunLock, RunLockError

REPO = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "launch"
TINY = ["--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
        "data.max_tokens=40000", "log.every=1"]


def env() -> dict:
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    e.pop("PRETRAIN_FAULT", None)
    e.pop("PRETRAIN_LAUNCHER_PID", None)
    return e


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            out.append(int(status.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_second_holder_is_refused_by_name_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pretrain.lifecycle import RunLock; "
                               f"RunLock({str(tmp_path)!r}, 'pretrain train').acquire(); print('held', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert RunLock(tmp_path, "probe").held_by()["pid"] == holder.pid  # what `pretrain status` asks
        with pytest.raises(RunLockError, match=rf"{tmp_path} is in use by pretrain train \(pid {holder.pid} on host "):
            RunLock(tmp_path, "pretrain iterate").acquire()
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level("WARNING", logger="pretrain.lifecycle"):
        lock = RunLock(tmp_path, "pretrain iterate").acquire()
    assert f"stale lock {tmp_path / '.lock'} from pretrain train (pid {holder.pid}" in caplog.text
    assert "not running" in caplog.text
    assert lock.holder()["pid"] == os.getpid()
    lock.release()
    assert RunLock(tmp_path, "probe").held_by() is None
    assert RunLock(tmp_path, "again").acquire().holder()["what"] == "again"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_workers_die_with_a_killed_launcher_and_a_second_training_is_refused(small_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [str(LAUNCH), "local", "--nproc", "2", "pretrain", "train", *TINY, f"run_dir={run}",
           f"data.shards={small_shards}", "optim.max_steps=100000", "checkpoint.every=100000"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                             cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: len(steps(run)) >= 1, 300, "the first training step")
        workers = children(first.pid)
        assert len(workers) == 2, workers
        second = subprocess.run([str(LAUNCH), "local", "--nproc", "1", "pretrain", "train", *TINY, f"run_dir={run}",
                                 f"data.shards={small_shards}"], capture_output=True, text=True, env=env(),
                                cwd=REPO, timeout=300)
        assert second.returncode != 0
        assert f"{run} is in use by pretrain train (pid {workers[0]}" in second.stderr or \
            f"{run} is in use by pretrain train (pid {workers[1]}" in second.stderr, second.stderr[-2000:]
        # SIGKILL of the launcher alone (not its process group): the workers follow it.
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        wait_for(lambda: not any(alive(w) for w in workers), 20, "the workers to die with their launcher")
        done = len(steps(run))
        time.sleep(2)
        assert len(steps(run)) == done  # nobody trains on
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sigcgt(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)


@pytest.mark.slow
def test_usr1_right_after_start_and_sigterm_mid_training_both_checkpoint(small_shards, tmp_path):
    """A requeued job can get USR1 while it is still importing torch: the handler is installed
    before that, so the signal means "checkpoint at step 1", not death. SIGTERM (scontrol
    requeue, scancel) checkpoints at the next step boundary too. Both exit 75 outside SLURM."""
    run = tmp_path / "usr1"
    bare = env()
    bare.pop("DS_ACCELERATOR")  # the console stays free of DeepSpeed's guess warning too
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", *TINY, f"run_dir={run}",
                             f"data.shards={small_shards}", "optim.max_steps=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bare, cwd=REPO)
    wait_for(lambda: sigcgt(proc.pid) & (1 << (signal.SIGUSR1 - 1)), 60, "the USR1 handler")
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    assert "libtorch" not in maps  # caught before the heavy imports
    os.kill(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert (run / "checkpoints/latest").read_text().strip() == "step_1"
    assert "Setting accelerator to CPU" not in err and "all_gather_into_tensor" not in err

    run = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "train", *TINY, f"run_dir={run}",
                             f"data.shards={small_shards}", "optim.max_steps=100000", "checkpoint.every=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    wait_for(lambda: len(steps(run)) >= 2, 300, "two training steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM: checkpointing at the next step boundary" in err
    saved = int((run / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    assert saved >= 2 and f"stopped by SIGTERM at step {saved}: checkpoint saved" in err


def test_a_preemption_signal_during_start_up_waits_for_the_trainer():
    """SLURM signals every process of a step: a USR1 while Python starts (before any handler)
    used to kill the task. A SLURM training task starts with USR1 blocked (launch.slurm's
    HOLD_USR1), and the trainer takes it once its handler is in place."""
    import signal
    import subprocess
    import sys
    import time

    from launch.slurm import HOLD_USR1

    for prefix, survives in ((HOLD_USR1, True), ([], False)):
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "pretrain.cli", "train", "--help"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.005)  # Python's own start-up takes longer than this
        proc.send_signal(signal.SIGUSR1)
        err = proc.communicate(timeout=60)[1]
        if survives:
            assert proc.returncode == 0 and "preemption signal (SIGUSR1)" in err, err
        else:
            assert proc.returncode == -signal.SIGUSR1
