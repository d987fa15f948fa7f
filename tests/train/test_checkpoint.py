"""Checkpoint bookkeeping without training: quarantine, pruning and the refusal to start over.
(Saving and loading through DeepSpeed are exercised by tests/train/test_train.py.)"""

from __future__ import annotations

import json

import pytest

from pretrain.utils import PretrainError, sha256_file
from pretrain.distributed import DistEnv
from pretrain.train.checkpoint import MANIFEST, CheckpointManager

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


def test_rank_states_are_plain_and_a_pickle_that_would_run_code_is_refused(tmp_path):
    """Resuming a run directory received from someone else must not run their code: our rank
    states load with weights_only, DeepSpeed's files are vetted before it unpickles them."""
    import io
    import os
    import random

    import numpy as np
    import torch

    from pretrain.train.checkpoint import load_rank_state, rng_state, set_rng_state, vet_deepspeed_files

    state = {"step": 3, "data": {"epoch": 1, "slots": {"0": {"offset": 7}}}, "rng": rng_state()}
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "rank_0.pt").write_bytes(buf.getvalue())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rank_0.pt") == []
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(load_rank_state(tmp_path / "rank_0.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

    evil = tmp_path / "ds"
    evil.mkdir()
    torch.save({"module": {}, "hook": os.system}, evil / "mp_rank_00_model_states.pt")
    with pytest.raises(PretrainError, match=r"mp_rank_00_model_states.pt names Python objects .*(posix|os)\.system"):
        vet_deepspeed_files(evil)
    torch.save({"rng": os.system}, tmp_path / "rank_1.pt")
    with pytest.raises(PretrainError, match=r"rank_1.pt names Python objects"):
        load_rank_state(tmp_path / "rank_1.pt")
