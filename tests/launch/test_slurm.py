"""``launch slurm`` against a real SLURM cluster on localhost (slurm/local-cluster.sh): munged,
slurmctld and slurmd, real sbatch / srun / scontrol / scancel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(sys.executable).parent / "launch"
CLUSTER = REPO / "slurm/local-cluster.sh"
LOCAL = REPO / "configs/cluster/local.yaml"


def launch(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(LAUNCH), "slurm", "--profile", str(LOCAL), *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def job_ids(proc: subprocess.CompletedProcess) -> list[str]:
    return [line.split("\t")[0] for line in proc.stdout.splitlines() if "\t" in line]


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_gone(env: dict, jobs: list[str], timeout: float = 400) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True,
                             text=True, env=env).stdout.split()
        if not out:
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs {jobs} still queued after {timeout} s")


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def logs(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("*.out")))


def test_dry_run_renders_a_multi_node_gpu_job(tmp_path):
    proc = subprocess.run([str(LAUNCH), "slurm", "--profile", str(REPO / "configs/cluster/example_gpu.yaml"),
                           "--set", "nodes=2", "--dry-run", "train", "--config", str(REPO / "configs/model/base.yaml"),
                           "data.shards=/data/shards", "data.labels=[km500]", f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR1@180", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=gpu", "#SBATCH --account=my-project",
                 "#SBATCH --qos=normal", "#SBATCH --constraint=a100|h100", "#SBATCH --mem=400G",
                 "#SBATCH --exclusive", "#SBATCH --time=48:00:00", "module load cuda/12.4"]:
        assert line in script.splitlines(), line
    assert re.search(r"^srun --kill-on-bad-exit=1 env --block-signal=USR1 /shared/envs/pretrain/bin/python -m "
                     r"pretrain.cli train "
                     r"--config \S+\.config\.yaml", script, re.M)
    # The rendezvous: SLURM's own expansion of the node list, that node's address as SLURM
    # knows it, a port from the job id. (Run for real by the preemption test, on two nodes.)
    assert 'first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert 'export MASTER_ADDR="${MASTER_ADDR:-$first_node}"' in script
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    # An offline stage renders as an array job whose batch shell requeues on the signal.
    proc = subprocess.run([str(LAUNCH), "slurm", "--profile", str(REPO / "configs/cluster/example_gpu.yaml"),
                           "--dry-run", "features", "mfcc", "--shards", "/data/shards", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-31%16" in proc.stdout and "#SBATCH --signal=B:USR1@180" in proc.stdout
    assert "#SBATCH --gpus=1" in proc.stdout and "trap requeue USR1" in proc.stdout
    # A bad config fails before anything is submitted, naming the field.
    proc = subprocess.run([str(LAUNCH), "slurm", "--dry-run", "train", "run_dir=x", "data.shards=y",
                           "deepspeed.zero_stage=5"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "deepspeed.zero_stage" in proc.stderr


# The settings of tests/train/test_train.py's launch() and of the `uninterrupted` run it makes.
TRAIN = ["--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
         "log.every=1", "optim.max_steps=16", "checkpoint.every=4", "data.max_tokens=40000", "deepspeed.grad_accum=2"]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.long
def test_preempted_training_checkpoints_requeues_and_resumes_exactly(slurm_env, small_shards, uninterrupted,
                                                                    tmp_path):
    straight, preempted, capped = uninterrupted, tmp_path / "preempted", tmp_path / "capped"
    requeued = tmp_path / "requeued"
    jobs = {}
    # The first run spans the cluster's two nodes (two slurmd on this host), one task on each:
    # the same 2 ranks as the reference, rendezvous across nodes.
    for name, run, extra, layout in (("preempted", preempted, [], ["--set", "nodes=2", "--set", "tasks_per_node=1"]),
                                     ("capped", capped, ["max_requeues=0"], []), ("requeued", requeued, [], [])):
        proc = launch(slurm_env, *layout, "train", *TRAIN, f"data.shards={small_shards}", f"run_dir={run}", *extra)
        jobs[name] = job_ids(proc)[0]
    # Signal the runs mid-training: USR1 to the job steps, as SLURM does before a time limit;
    # USR1 to the batch shell as well (--full, what some sites' preemption does: it used to
    # kill the job with no checkpoint); and `scontrol requeue`, which sends SIGTERM (it used to
    # lose the work since the last checkpoint).
    signals = {"preempted": ["scancel", "--signal=USR1", jobs["preempted"]],
               "capped": ["scancel", "--signal=USR1", "--full", jobs["capped"]],
               "requeued": ["scontrol", "requeue", jobs["requeued"]]}
    signalled = {}
    end = time.monotonic() + 400
    while len(signalled) < 3:
        assert time.monotonic() < end, "training did not reach step 4"
        for name, run in (("preempted", preempted), ("capped", capped), ("requeued", requeued)):
            if name not in signalled and (run / "metrics.jsonl").exists() and len(losses(run)) >= 4:
                subprocess.run(signals[name], check=True, env=slurm_env)
                signalled[name] = time.time()
        time.sleep(0.2)
    wait_gone(slurm_env, list(jobs.values()))

    # Requeued once, resumed from the preemption checkpoint, completed; losses equal those of
    # the same training run uninterrupted (launched locally with torchrun) at every step.
    info = job_info(slurm_env, jobs["preempted"])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    assert sorted(losses(straight)) == list(range(1, 17))
    assert losses(preempted) == losses(straight)
    log = logs(preempted / "slurm")
    assert "restart 0 on n[1-2] (rendezvous 127.0.0.1:" in log and "restart 1 on" in log  # both runs in one file
    step = int(re.search(r"preempted at step (\d+): checkpoint saved; requeueing", log).group(1))
    assert 4 <= step < 16 and f"resumed from step {step}:" in log
    # One wandb run id across the restart.
    run_id = (preempted / "wandb_id").read_text().strip()
    offline = sorted((preempted / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    # ... read back from wandb's own records: both attempts are that one run, and between them
    # they hold every logged step (what `wandb sync` uploads as one curve).
    from tests.train.wandb_records import records

    attempts = [[r for r in records(next(p.glob("run-*.wandb")))] for p in offline]
    assert {r.run.run_id for rs in attempts for r in rs if r.WhichOneof("record_type") == "run"} == {run_id}
    steps = [r.history.step.num for rs in attempts for r in rs if r.WhichOneof("record_type") == "history"]
    assert set(losses(preempted)) <= set(steps) and steps[0] == 1
    # Preemption to resume, measured: signal -> "resumed from step" in the log.
    resumed = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) INFO pretrain.train.loop: resumed from step", log)
    t = time.mktime(time.strptime(resumed.group(1), "%Y-%m-%d %H:%M:%S")) + int(resumed.group(2)) / 1000
    print(f"\npreemption signal -> resumed training: {t - signalled['preempted']:.1f} s")

    # With the requeue budget spent, the run checkpoints and fails with the reason, never COMPLETED.
    info = job_info(slurm_env, jobs["capped"])
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    log = logs(capped / "slurm")
    assert "max_requeues=0" in log and "not requeueing" in log
    step = int(re.search(r"preempted at step (\d+): checkpoint saved, but", log).group(1))
    assert (capped / "checkpoints/latest").read_text().strip() == f"step_{step}"
    assert "the batch shell got USR1" in log

    # `scontrol requeue`: SIGTERM, a checkpoint at the next step boundary, the requeued job
    # resumes from it and completes with the uninterrupted losses.
    info = job_info(slurm_env, jobs["requeued"])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    log = logs(requeued / "slurm")
    step = int(re.search(r"stopped by SIGTERM at step (\d+): checkpoint saved", log).group(1))
    assert 4 <= step < 16 and f"resumed from step {step}:" in log
    assert losses(requeued) == losses(straight)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_assign_and_a_requeued_task_redoes_only_its_unfinished_shards(slurm_env, small_shards, tmp_path):
    from pretrain.cli import main

    assert main(["features", "mfcc", "--shards", str(small_shards), "--out", str(tmp_path / "f"),
                 "--fraction", "0.3", "--no-progress"]) == 0
    assert main(["kmeans", "fit", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "k"), "--k", "8",
                 "--no-progress"]) == 0
    name = f"km8_{tmp_path.name}"
    proc = launch(slurm_env, "--tasks", "2", "kmeans", "assign", "--kmeans", str(tmp_path / "k"),
                  "--shards", str(small_shards), "--name", name)
    array = job_ids(proc)[0]
    wait_gone(slurm_env, [array])
    labels = small_shards / "labels" / name
    shards = sorted(e["name"] for e in json.loads((small_shards / "manifest.json").read_text())["shards"])
    assert (labels / "meta.json").is_file()
    for task in (0, 1):
        assert job_info(slurm_env, f"{array}_{task}")["JobState"] == "COMPLETED"
    sidecars = {s: next(labels.glob(s.replace(".tar", "") + "*")) for s in shards}
    before = {s: p.stat().st_mtime_ns for s, p in sidecars.items()}

    # Task 1 owns the odd shards. Leave one of them unfinished (its done-record gone), as a
    # task cancelled mid-way would, and requeue task 1.
    unfinished = shards[3]
    (labels / ".assign" / f"{unfinished}.json").unlink()
    subprocess.run(["scontrol", "requeue", f"{array}_1"], check=True, env=slurm_env)
    time.sleep(1)
    wait_gone(slurm_env, [array])
    info = job_info(slurm_env, f"{array}_1")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    after = {s: p.stat().st_mtime_ns for s, p in sidecars.items()}
    assert [s for s in shards if after[s] != before[s]] == [unfinished]
    assert (labels / ".assign" / f"{unfinished}.json").is_file()
    assert "restart 1" in "".join(p.read_text() for p in (labels / "slurm").glob("*_1.out"))


@pytest.mark.slurm
@pytest.mark.slow
def test_a_chain_runs_in_order_and_a_failed_stage_cancels_the_next(slurm_env, small_shards, tmp_path):
    quality = f"kmeans quality --shards {small_shards} --labels phones50 --reference phones50"
    proc = launch(slurm_env, "--stage", f"{quality} --out {tmp_path / 'q1'}",
                  "--stage", f"{quality} --out {tmp_path / 'q2'}")
    first, second = job_ids(proc)
    assert job_info(slurm_env, second)["Dependency"].startswith(f"afterok:{first}")
    # A first stage that fails (no such features) and the stage after it.
    proc = launch(slurm_env, "--stage", f"kmeans fit --features {tmp_path / 'nowhere'} --out {tmp_path / 'k'} --k 4",
                  "--stage", f"{quality} --out {tmp_path / 'q3'}")
    failing, dependent = job_ids(proc)
    wait_gone(slurm_env, [first, second, failing, dependent])
    a, b = job_info(slurm_env, first), job_info(slurm_env, second)
    assert a["JobState"] == b["JobState"] == "COMPLETED"
    assert b["StartTime"] >= a["EndTime"]
    assert (tmp_path / "q1/quality.json").stat().st_mtime <= (tmp_path / "q2/quality.json").stat().st_mtime
    assert job_info(slurm_env, failing)["JobState"] == "FAILED"
    assert job_info(slurm_env, dependent)["JobState"] == "CANCELLED"
    assert not (tmp_path / "q3/quality.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.long
def test_training_under_slurm_submits_a_probe_job_per_checkpoint(slurm_env, small_shards, tmp_path):
    """probe.every under SLURM: the training job submits `pretrain probe` as a job of its own per
    probed checkpoint, with the profile it was launched with."""
    run = tmp_path / "run"
    proc = launch(slurm_env, "train", *TRAIN[:4], "log.every=1", "optim.max_steps=4", "checkpoint.every=4",
                  "data.max_tokens=40000", "optim.warmup_steps=1", "model.frontend=fbank", f"data.shards={small_shards}",
                  f"run_dir={run}",
                  "probe.every=1", f"probe.eval_shards={small_shards}",
                  "probe.overrides=[probes=phone,baselines=none,layers=2,phone.epochs=4,phone.ctc_epochs=1]")
    train_job = job_ids(proc)[0]
    wait_gone(slurm_env, [train_job])
    assert job_info(slurm_env, train_job)["JobState"] == "COMPLETED", logs(run / "slurm")
    assert "probe job" in logs(run / "slurm")
    launched = [json.loads(p.read_text()) for p in (run / "probes/step_4/slurm").glob("*.launch.json")]
    assert len(launched) == 1 and launched[0]["stage"] == "probe"
    wait_gone(slurm_env, [launched[0]["job_id"]])
    assert job_info(slurm_env, launched[0]["job_id"])["JobState"] == "COMPLETED"
    record = json.loads((run / "probes/step_4/probe.json").read_text())
    assert record["step"] == 4 and record["rows"]["model"]["layers"]["2"]["phone_acc"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the local cluster runs as root")
def test_the_local_cluster_only_uses_a_private_directory_it_created(tmp_path):
    """Everything in the cluster's directory runs as root (munge key, slurm.conf, the pid files
    `down` kills): a directory another user could have written to is refused before use."""
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o755)
    (planted / "slurmd.pid").write_text("1\n")
    for command in ("up", "down"):
        proc = subprocess.run([str(CLUSTER), command, str(planted)], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "has mode 755" in proc.stderr and "refusing" in proc.stderr, proc.stderr
    planted.chmod(0o700)
    proc = subprocess.run([str(CLUSTER), "up", str(planted)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "was not created by local-cluster.sh" in proc.stderr
    os.chown(planted, 65534, 65534)
    proc = subprocess.run([str(CLUSTER), "down", str(planted)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "belongs to uid 65534" in proc.stderr
    assert (planted / "slurmd.pid").read_text() == "1\n"  # nothing was read or killed


def test_dry_run_quotes_paths_parses_times_and_hides_credentials(tmp_path):
    def dry(*args: str) -> subprocess.CompletedProcess:
        options, overrides = [a for a in args if "run_dir=" not in a], [a for a in args if "run_dir=" in a]
        return subprocess.run([str(LAUNCH), "slurm", "--profile", str(LOCAL), *options, "--dry-run", "train",
                               "data.shards=/data/shards", "data.labels=[km500]", *overrides], capture_output=True,
                              text=True, timeout=120, cwd=REPO)

    spaced = tmp_path / "my runs" / "a b"
    proc = dry("--set", "time=30:00", "--set", "setup=[export WANDB_API_KEY=abc123,module load cuda]",
               f"run_dir={spaced}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert next(line for line in lines if line.startswith("#SBATCH --output=")).startswith(
        f'#SBATCH --output="{spaced}/slurm/train-')
    assert "#SBATCH --time=30:00" in lines  # not 1800 (YAML 1.1's base-60 reading)
    assert "abc123" not in proc.stdout and "export WANDB_API_KEY=<redacted>" in lines and "module load cuda" in lines
    # The batch shell survives USR1 and SIGTERM, passing USR1 on to the training processes.
    assert any(line.startswith("trap ") and line.endswith(" USR1") for line in lines)
    assert any(line.startswith("trap ") and line.endswith(" TERM") for line in lines)

    proc = dry(f"run_dir={tmp_path / 'run_%j'}")
    assert proc.returncode == 1 and "contains '%': SLURM expands '%' in log paths" in proc.stderr
    proc = dry("--set", "time=90", f"run_dir={tmp_path}")
    assert proc.returncode == 2 and "field 'time': '90' is a bare number, which SLURM reads as minutes" in proc.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.long
def test_launch_slurm_iterate_runs_the_whole_chain_through_a_preemption(slurm_env, tiny_corpus, small_shards,
                                                                       tmp_path, monkeypatch):
    """An iteration as a chain of SLURM jobs (array stages on 2 tasks, training on 2 ranks, the
    held-out probes, export, report), its training preempted with USR1: every job ends
    COMPLETED, the report is written, and `pretrain status` reads the run from its submission
    on. (One iteration: a second adds the same kinds of jobs, and how an iteration builds on the
    one before is tested locally in tests/pipeline/test_iterate.py; CI time.)"""
    from pretrain.pipeline.status import format_status, run_status
    from tests.pipeline.test_iterate import OVERRIDES

    run = tmp_path / "run"
    overrides = [o for o in OVERRIDES(run, tiny_corpus, small_shards) if not o.startswith("iterations.")]
    proc = launch(slurm_env, "iterate", "--config", str(REPO / "configs/demo.yaml"), *overrides,
                  "iterations=[{features: mfcc, k: 20, fraction: 0.5, max_frames: 400000, max_steps: 16}]")
    jobs = {line.split("\t")[1].removeprefix("iterate "): line.split("\t")[0]
            for line in proc.stdout.splitlines() if "\t" in line}
    assert list(jobs)[-1] == "export" and "it1.train" in jobs and "it2.train" not in jobs and len(jobs) >= 8
    # Readable from the first minute: every stage, with its SLURM job.
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    first = run_status(run)
    assert [row["name"] for row in first["stages"]] == list(jobs)
    assert all(row["slurm_job"] == jobs[row["name"]] for row in first["stages"])
    assert {row["slurm_state"] for row in first["stages"]} <= {"PENDING", "RUNNING", "CONFIGURING"}
    assert "PENDING" in format_status(first)

    # Every job's states (an array job's: its tasks') at the last look SLURM still showed it
    # (it forgets finished jobs after MinJobAge).
    last: dict[str, set[str]] = {}
    restarts: dict[str, str] = {}

    def poll() -> None:
        out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, env=slurm_env).stdout
        now: dict[str, set[str]] = {}
        for line in out.splitlines():
            info = dict(re.findall(r"(\w+)=(\S*)", line))
            job = info.get("ArrayJobId") or info.get("JobId")
            now.setdefault(job, set()).add(info.get("JobState"))
            restarts[job] = info.get("Restarts")
        last.update(now)

    end = time.monotonic() + 600
    while not ((run / "it1/train/metrics.jsonl").exists() and len(losses(run / "it1/train")) >= 3):
        assert time.monotonic() < end, "it1.train did not reach step 3:\n" + logs(run / "slurm")[-3000:]
        poll()
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", jobs["it1.train"]], check=True, env=slurm_env)
    terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}
    end = time.monotonic() + 900
    while not all(last.get(job) and last[job] <= terminal for job in jobs.values()):
        assert time.monotonic() < end, f"jobs not finished: {last}"
        poll()
        time.sleep(1)
    final = {name: last[job] for name, job in jobs.items()}
    assert final == {name: {"COMPLETED"} for name in jobs}, (final, logs(run / "slurm")[-5000:])
    assert restarts[jobs["it1.train"]] == "1"
    log = logs(run / "slurm")
    step = int(re.search(r"preempted at step (\d+): checkpoint saved; requeueing", log).group(1))
    assert 3 <= step < 16 and f"resumed from step {step}:" in log
    assert sorted(losses(run / "it1/train")) == list(range(1, 17))
    assert "it1" in (run / "report.md").read_text() and (run / "hf/config.json").is_file()
    status = run_status(run)
    assert all(row["state"] == "done" for row in status["stages"]), format_status(status)
