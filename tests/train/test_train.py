"""Real DeepSpeed training on CPU: 2 processes over gloo, the tiny model, the gold phone
labels of the synthetic corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(sys.executable).parent / "launch"


def launch(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2, fault: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("PRETRAIN_FAULT", None)
    if fault:
        env["PRETRAIN_FAULT"] = json.dumps(fault)
    cmd = [str(LAUNCH), "local", "--nproc", str(nproc), "pretrain", "train",
           "--config", str(REPO / "configs/model/tiny.yaml"), "--config", str(REPO / "configs/train/tiny_cpu.yaml"),
           "--run-dir", str(run_dir), f"data.shards={shards}", "log.every=1", "optim.max_steps=16",
           "checkpoint.every=4", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed run appends: later wins
    return out


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("train") / "straight"
    launch(run, small_shards, "deepspeed.grad_accum=2")
    return run


def test_resume_in_a_fresh_process_gives_bitwise_equal_losses(uninterrupted, small_shards, tmp_path):
    run = tmp_path / "resumed"
    launch(run, small_shards, "deepspeed.grad_accum=2", fault={"exit_after_save": 8})
    assert max(losses(run)) == 8
    launch(run, small_shards, "deepspeed.grad_accum=2")
    straight, resumed = losses(uninterrupted), losses(run)
    assert sorted(straight) == list(range(1, 17))
    assert resumed == straight  # every step, bit for bit (JSON keeps all float digits)
    # The checkpoint folder keeps the last two complete checkpoints; `latest` names the newest.
    folders = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step_12", "step_16"]
    assert (run / "checkpoints/latest").read_text().strip() == "step_16"
    # One wandb run id across the restart, and its offline runs use it.
    run_id = (run / "wandb_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)
    # TensorBoard got the scalars.
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, small_shards, tmp_path):
    run = tmp_path / "fallback"
    launch(run, small_shards, "deepspeed.grad_accum=2", "checkpoint.keep_last=3",
           fault={"exit_after_save": 12})
    victim = next((run / "checkpoints/step_12/ds").glob("*model_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (run / "checkpoints/step_16.tmp").mkdir()  # an unfinished save left behind
    proc = launch(run, small_shards, "deepspeed.grad_accum=2", "checkpoint.keep_last=3")
    assert f"skipping checkpoint step_12: {victim} does not match its sha256" in proc.stderr
    assert "removing the unfinished checkpoint" in proc.stderr
    assert losses(run) == losses(uninterrupted)  # resumed at step 8, same trajectory


def test_nan_on_one_rank_changes_no_parameter(small_shards, tmp_path):
    run = tmp_path / "nan"
    proc = launch(run, small_shards, "optim.max_steps=4", "optim.warmup_steps=1", "checkpoint.every=1",
                  "checkpoint.keep_last=10",
                  fault={"nan_at": 2, "nan_rank": 1})
    assert "step 2: non-finite loss on some rank" in proc.stderr
    import torch

    def weights(step):
        return torch.load(run / f"checkpoints/step_{step}/model.pt", weights_only=True)["state_dict"]

    before, after, later = weights(2), weights(3), weights(4)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN step changed nothing
    assert any(not torch.equal(after[k], later[k]) for k in after)  # the next one trains


def test_too_many_bad_steps_stop_with_a_clear_message(small_shards, tmp_path):
    proc = launch(tmp_path / "bad", small_shards, "optim.max_steps=4", "optim.warmup_steps=1", "max_bad_steps=1",
                  fault={"nan_at": 1, "nan_rank": 0}, check=False)
    assert proc.returncode != 0
    assert "consecutive steps with a non-finite loss" in proc.stderr


def test_gradients_do_not_depend_on_how_the_batch_is_split(tmp_path):
    # 1 rank with 4 utterances vs 2 ranks with 2 each: equal gradients, because the loss is a
    # sum over frames divided by the masked-frame count of all ranks.
    import torch

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    grads = {}
    for nproc in (1, 2):
        out = tmp_path / f"grads{nproc}.pt"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                               "--master_port", str(free_port()), str(REPO / "tests/train/grad_child.py"),
                               str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        grads[nproc] = torch.load(out, weights_only=True)
    assert grads[1].keys() == grads[2].keys()
    worst = max((grads[1][k] - grads[2][k]).abs().max().item() for k in grads[1])
    assert worst < 1e-6, worst
    assert max(g.abs().max().item() for g in grads[1].values()) > 1e-3  # not trivially zero
