"""`launch local`: one node, or several nodes through torchrun's static rendezvous. Two "nodes"
run here as two launchers on one host talking gloo over TCP, exactly as two machines would
(only the address differs). This is also the bitwise resume test of training: a run killed
mid-step and relaunched gives the uninterrupted run's losses at every step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import free_port
from tests.train.test_train import LAUNCH, REPO, launch, losses

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def start_node(run: Path, shards: Path, node_rank: int, port: int, log: Path) -> subprocess.Popen:
    # The same training as the `uninterrupted` reference (2 ranks, grad_accum 2, 16 steps),
    # laid out as 2 nodes of 1 process instead of 1 node of 2 (CI has 2 cores).
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("PRETRAIN_FAULT", None)
    cmd = [str(LAUNCH), "local", "--nnodes", "2", "--node-rank", str(node_rank), "--nproc", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "pretrain", "train",
           "--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
           "--run-dir", str(run), f"data.shards={shards}", "log.every=1", "optim.max_steps=16",
           "checkpoint.every=4", "data.max_tokens=40000", "deepspeed.grad_accum=2"]
    return subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.long
def test_two_nodes_survive_a_killed_node_resume_bitwise_then_continue_on_one_node(uninterrupted, small_shards,
                                                                          tmp_path):
    run, log = tmp_path / "two_nodes", tmp_path / "nodes.log"
    port = free_port()
    nodes = [start_node(run, small_shards, rank, port, log) for rank in (0, 1)]
    # Node 1 dies with SIGKILL (its launcher and, through the parent-death signal, its worker)
    # once step 8 is saved, that is in the middle of the steps after it.
    wait_for(lambda: (run / "checkpoints/step_8/manifest.json").is_file() or nodes[0].poll() is not None,
             300, "step_8")
    os.kill(nodes[1].pid, signal.SIGKILL)
    # Node 0's rank sees its peer's connection close in the next collective and fails.
    assert nodes[0].wait(timeout=120) != 0, log.read_text()[-4000:]
    nodes[1].wait(timeout=10)
    assert not (run / "checkpoints/step_16").exists(), "the node was killed after the run ended"
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    assert 8 in saved and max(saved) < 16, saved
    one_node = tmp_path / "one_node"
    shutil.copytree(run / "checkpoints" / f"step_{max(saved)}", one_node / "checkpoints" / f"step_{max(saved)}")

    # Both nodes relaunched (a new port: the old one may linger in TIME_WAIT) resume from the
    # newest checkpoint and reach the reference's losses bit for bit.
    port = free_port()
    nodes = [start_node(run, small_shards, rank, port, log) for rank in (0, 1)]
    assert [n.wait(timeout=300) for n in nodes] == [0, 0], log.read_text()[-4000:]
    assert f"resumed from step {max(saved)}" in log.read_text()
    straight = losses(uninterrupted)
    assert losses(run) == straight and sorted(straight) == list(range(1, 17))  # every step, bit for bit
    # Every optimizer step applied an update (DeepSpeed counts them), with 2 micro-batches each.
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["optimizer_updates"] for r in records if "loss" in r] == list(range(1, 17))
    # Throughput is logged for the audio and for what the model computed on (padding included).
    assert all(r["padded_audio_s_per_s"] >= r["audio_s_per_s"] > 0 for r in records if "loss" in r)
    # The checkpoint folder keeps the last two complete checkpoints; `latest` names the newest.
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_12", "step_16"]
    assert (run / "checkpoints/latest").read_text().strip() == "step_16"
    # One wandb run id across the restart, and its offline runs use it; TensorBoard got the scalars.
    run_id = (run / "wandb_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # The same checkpoint continued on one node by one process: ZeRO's partitioned optimizer
    # state goes through DeepSpeed's universal format, the data through the loader's
    # repartition (test_resume_with_another_process_count checks the loaded state in detail).
    # Other batches, the same weights and optimizer state: the losses stay at the trained level.
    # It also switches compilation and activation checkpointing on, which a resume allows
    # (they change how a step is computed, not the model), and runs them in the real trainer.
    proc = launch(one_node, small_shards, "deepspeed.grad_accum=2", "model.compile=true",
                  "model.checkpoint_activations=true", nproc=1)
    assert "converting it to DeepSpeed's universal format" in proc.stderr and "world_size 2 -> 1" in proc.stderr
    assert f"resumed from step {max(saved)}" in proc.stderr
    resumed = losses(one_node)
    assert sorted(resumed) == list(range(max(saved) + 1, 17))
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) < 0.1 * straight[step], (step, loss, straight[step])


def test_several_nodes_need_an_address_and_a_port():
    for args, message in ((["--nnodes", "2", "--node-rank", "1"], "give --master-addr"),
                          (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1"],
                           "--node-rank must be in 0..1")):
        proc = subprocess.run([str(LAUNCH), "local", *args, "pretrain", "train"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # What torchrun is given, on the page: --help names the multi-node options.
    out = subprocess.run([sys.executable, "-m", "launch.cli", "local", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60).stdout
    assert "--nnodes" in out and "--master-addr" in out and "--master-port" in out


def test_a_config_error_is_one_line_before_any_worker_starts(tmp_path):
    # The tiny config warms up for 5 steps: 4 steps in all is refused, once, with status 2.
    proc = subprocess.run([str(LAUNCH), "local", "--nproc", "2", "pretrain", "train",
                           "--config", str(REPO / "configs/model/tiny.yaml"),
                           "--config", str(REPO / "configs/train/tiny_cpu.yaml"), "--run-dir", str(tmp_path / "run"),
                           "data.shards=/nowhere", "optim.max_steps=4"], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("pretrain train: config error:") and "warmup_steps" in lines[0]
    assert "ChildFailedError" not in proc.stderr and not (tmp_path / "run").exists()
