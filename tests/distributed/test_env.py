"""The process's place in the job, from torchrun's variables or SLURM's; SLURM node lists are
expanded as SLURM does; a requeue outlasts a briefly unreachable controller."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.distributed import first_host, read_env, requeue_slurm_job, slurm_port

from tests.launch.test_slurm import job_info


@pytest.mark.parametrize("nodelist,first", [
    ("node[01-02]-ib", "node01-ib"),          # a suffix after the brackets
    ("r[1-2]n[01-04]", "r1n01"),              # several bracket groups
    ("gpu[003-005,009],cpu1", "gpu003"),      # zero padding, ranges and lists, commas
    ("gpu[009,003-005]", "gpu009"),           # SLURM keeps the order given
    ("cn-12", "cn-12"),
    ("login1,compute[7-8]", "login1"),
    ("a100-[0-1]x", "a100-0x"),
])
def test_slurm_node_lists_expand_like_slurm(nodelist, first):
    assert first_host(nodelist) == first


def test_a_malformed_node_list_is_named():
    with pytest.raises(ValueError, match=r"cannot expand SLURM node list 'node\[01-'"):
        first_host("node[01-")


def test_slurm_variables_give_rank_world_and_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "r[1-2]n[01-02]"}
    dist = read_env(env)
    assert (dist.rank, dist.world_size, dist.local_rank) == (5, 8, 1)
    assert dist.master_addr == "r1n01" and dist.master_port == slurm_port(123456) == 20000 + 123456 % 20000
    # What the sbatch template exports wins.
    dist = read_env({**env, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511"})
    assert (dist.master_addr, dist.master_port) == ("10.0.0.7", 29511)
    # torchrun's variables come first.
    dist = read_env({**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (dist.rank, dist.world_size, dist.master_addr) == (0, 2, "h")


def _stand_in_scontrol(folder: Path, fail_first: int) -> Path:
    """An ``scontrol`` earlier in PATH that fails like an unreachable controller the first
    ``fail_first`` times (each call counted in ``calls``), then runs the real one."""
    real = shutil.which("scontrol") or "/bin/false"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f"""#!/bin/sh
echo call >> {folder}/calls
if [ "$(wc -l < {folder}/calls)" -le {fail_first} ]; then
  echo "slurm_requeue error: Unable to contact slurm controller (connect failure)" >&2
  exit 1
fi
exec {real} "$@"
""")
    script.chmod(0o755)
    return folder


def test_a_requeue_that_keeps_failing_is_retried_then_raised_with_every_error(tmp_path, monkeypatch, caplog):
    stand_in = _stand_in_scontrol(tmp_path / "bin", fail_first=99)
    monkeypatch.setenv("PATH", f"{stand_in}:{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match=r"scontrol requeue 123 failed 3 times: 1\. exit 1: slurm_requeue error: "
                                           r"Unable to contact slurm controller .*; 3\. exit 1"):
        requeue_slurm_job("123", attempts=3, delay=0.01)
    assert len((stand_in / "calls").read_text().splitlines()) == 3
    assert "retrying in 0.02 s (attempt 3 of 3)" in caplog.text


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeue_survives_a_briefly_unreachable_controller(slurm_env, tmp_path, monkeypatch):
    """On the local cluster: a running batch job is requeued although the first two
    ``scontrol`` calls fail; SLURM counts one restart."""
    env = slurm_env
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "-o", str(tmp_path / "%j.out"), "--wrap", "sleep 120"],
                         capture_output=True, text=True, env=env, check=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while job_info(env, job).get("JobState") != "RUNNING":
            assert time.monotonic() < deadline, job_info(env, job)
            time.sleep(0.3)
        stand_in = _stand_in_scontrol(tmp_path / "bin", fail_first=2)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PATH", f"{stand_in}:{env['PATH']}")
        requeue_slurm_job(job, delay=0.05)
        assert len((stand_in / "calls").read_text().splitlines()) == 3
        deadline = time.monotonic() + 60
        while job_info(env, job).get("Restarts") != "1":
            assert time.monotonic() < deadline, job_info(env, job)
            time.sleep(0.3)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
