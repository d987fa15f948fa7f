"""Checkpoint bookkeeping without training: quarantine, pruning and the refusal to start over.
(Saving and loading through DeepSpeed are exercised by tests/train/test_train.py.)"""

from __future__ import annotations

import json

import pytest

from pretrain.data.shards import sha256_file
from pretrain.distributed import DistEnv
from pretrain.train.checkpoint import MANIFEST, CheckpointManager
from pretrain.utils import PretrainError

ONE = DistEnv(0, 1, 0, "127.0.0.1", 29500)


def make(root, step: int, damaged: bool = False) -> None:
    """A complete checkpoint folder as ``CheckpointManager.save`` leaves it."""
    folder = root / f"step_{step}"
    folder.mkdir(parents=True)
    (folder / "rank_0.pt").write_bytes(b"state %d" % step)
    files = {"rank_0.pt": sha256_file(folder / "rank_0.pt")}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    if damaged:
        (folder / "rank_0.pt").write_bytes(b"flipped")


def test_damaged_checkpoints_are_quarantined_and_never_take_a_kept_place(tmp_path):
    root = tmp_path / "checkpoints"
    for step, damaged in ((2, False), (4, False), (6, True), (8, True)):
        make(root, step, damaged)
    manager = CheckpointManager(root, ONE, keep_last=2)
    assert manager.find_resume() == 4
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4", "step_6.bad", "step_8.bad"]
    # The next save after the fallback is step 5: it and the newest verified one are kept,
    # the damaged ones stay quarantined (the old pruning kept 8 and 6 and deleted 5).
    make(root, 5)
    manager.verified.add(5)
    manager._prune(5)
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_5", "step_6.bad", "step_8.bad"]
    make(root, 7)
    manager.verified.add(7)
    manager._prune(7)
    assert sorted(p.name for p in root.iterdir()) == ["step_5", "step_6.bad", "step_7", "step_8.bad"]


def test_the_newest_save_is_never_pruned_and_a_foreign_newer_checkpoint_is_left_alone(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    make(root, 2)
    manager = CheckpointManager(root, ONE, keep_last=2)
    assert manager.find_resume() == 2
    make(root, 9)  # not verified by this run: say, left by another process
    make(root, 3)
    manager.verified.add(3)
    with caplog.at_level("WARNING"):
        manager._prune(3)
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3", "step_9"]
    assert "not pruning checkpoint step_9" in caplog.text


def test_a_run_whose_checkpoints_all_fail_verification_is_not_restarted_silently(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 2, damaged=True)
    make(root, 4, damaged=True)
    with pytest.raises(PretrainError, match=r"none passes verification \(quarantined: step_2.bad, step_4.bad\); "
                                            r"refusing to train from step 0.*checkpoint.start_over=true"):
        CheckpointManager(root, ONE).find_resume()
    # Still refused the next time (only quarantined folders are left) ...
    with pytest.raises(PretrainError, match="refusing to train from step 0"):
        CheckpointManager(root, ONE).find_resume()
    # ... unless asked; the quarantined folders stay.
    assert CheckpointManager(root, ONE, start_over=True).find_resume() is None
    assert sorted(p.name for p in root.iterdir()) == ["step_2.bad", "step_4.bad"]
    # An empty or missing folder is a new run.
    assert CheckpointManager(tmp_path / "new", ONE).find_resume() is None
