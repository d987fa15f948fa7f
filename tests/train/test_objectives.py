"""The trainer's objective interface and its fault hooks: the loop names no objective, and each
hook fires exactly at its point (the multi-process tests in test_train.py and test_fail_fast.py
run them for real)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.train.faults import Faults
from pretrain.train.objectives import OBJECTIVES, Data2VecObjective, Objective, Wav2Vec2Objective, objective_for
from pretrain.utils import PretrainError

from tests.train.test_loop import cfg

LOOP = Path(__file__).resolve().parents[2] / "pretrain" / "train" / "loop.py"


def test_the_loop_knows_no_objective_by_name():
    """A new objective is a class in OBJECTIVES: nothing in the loop names one, or what one
    keeps beside the model."""
    tree = ast.parse(LOOP.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(node.value.lower().split())
        elif isinstance(node, ast.Name):
            words.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            words.add(node.attr.lower())
        elif isinstance(node, ast.alias):
            words.add(node.name.lower())
    named = {w for w in words if any(n in w for n in ("data2vec", "hubert", "teacher", "ema_", "emateacher",
                                                        "wav2vec", "gumbel", "negatives", "quantiz"))}
    assert named <= {"hubertpretrain"}, named  # the model class's name, shared by every objective


def test_each_objective_is_found_by_its_config_name():
    assert type(objective_for(cfg())) is Objective
    assert type(objective_for(cfg("model.objective=data2vec", "data.labels=[]", "model.data2vec.top_k_layers=2"))) \
        is Data2VecObjective
    assert type(objective_for(cfg("model.objective=wav2vec2", "data.labels=[]"))) is Wav2Vec2Objective
    assert set(OBJECTIVES) == {"hubert", "data2vec", "wav2vec2"}


def test_wav2vec2_extras_depend_on_step_and_rank_only_and_the_guard_stops_a_collapse():
    objective = objective_for(cfg("model.objective=wav2vec2", "data.labels=[]", "model.wav2vec2.num_vars=4",
                                  "model.wav2vec2.collapse_check_after=10", "model.wav2vec2.collapse_windows=2"))
    objective.prepare(None, None)
    draws = [torch.rand(3, generator=objective.forward_extras(step, rank)["generator"])
             for step, rank in ((5, 0), (5, 0), (5, 1), (6, 0))]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], draws[3])
    assert objective.forward_extras(0, 0)["temperature"] == 2.0
    # The window's sums: contrastive, diversity, correct; soft and hard code usage per group.
    spread = np.ones(8)
    collapsed = np.array([9.0, 0, 0, 0, 9, 0, 0, 0])
    sums = {"wav2vec2/scalars": np.array([20.0, 1.0, 5.0]), "wav2vec2/soft": spread, "wav2vec2/hard": collapsed}
    metrics = objective.metrics(12, sums, 10.0)
    assert metrics["contrastive_loss"] == 2.0 and metrics["acc_contrastive"] == 0.5
    assert metrics["prob_ppl/g0"] == pytest.approx(4.0, rel=1e-5) and metrics["code_ppl/g1"] == pytest.approx(1.0)
    assert objective.state_dict() == {"low_windows": 1}
    objective.load_state_dict({"low_windows": 1})  # a resumed run keeps counting
    with pytest.raises(PretrainError, match="perplexity stayed below model.wav2vec2.min_code_perplexity=2.0 for 2"):
        objective.metrics(13, sums, 10.0)
    objective.load_state_dict({"low_windows": 1})
    objective.metrics(14, {**sums, "wav2vec2/hard": spread}, 10.0)  # a healthy window resets the count
    assert objective.state_dict() == {"low_windows": 0}
    with pytest.raises(PretrainError, match="expected"):
        objective.load_state_dict({"low_windows": 0, "other": 1})


def test_a_wav2vec2_resume_from_a_model_file_without_its_state_is_refused(tmp_path):
    from pretrain.model.checkpoint import save_model
    from pretrain.model.wav2vec2 import Wav2Vec2Pretrain

    config = cfg("model.objective=wav2vec2", "data.labels=[]", "model.wav2vec2.num_vars=4")
    objective = objective_for(config)
    model = Wav2Vec2Pretrain(config.model)
    save_model(tmp_path / "model.pt", model)  # as another tool or objective would: no objective_state
    with pytest.raises(PretrainError, match="holds no objective state"):
        objective.prepare(model, tmp_path)
    save_model(tmp_path / "model.pt", model, objective_state={"low_windows": 2})
    objective.prepare(model, tmp_path)
    assert objective.state_dict() == {"low_windows": 2}


def test_fault_hooks_fire_at_their_step_on_their_rank_only():
    save = Faults({"raise_at": 3, "rank": 1, "where": "save"}, rank=1)
    save.before_save(2)
    with pytest.raises(RuntimeError, match="an error while saving step 3"):
        save.before_save(3)
    Faults({"raise_at": 3, "rank": 1, "where": "save"}, rank=0).before_save(3)
    probe = Faults({"raise_at": 4, "where": "probe"}, rank=0)
    with pytest.raises(PretrainError, match="the probe of step 4"):
        probe.before_probe(4)
    forward = Faults({"raise_at": 5, "rank": 0, "where": "forward", "kill_at": 7, "nan_at": 2, "nan_rank": 0}, rank=0)
    assert forward.in_step(4) == (False, {"kill": False, "nan_grad": False, "raise": True})  # step 5 runs now
    assert forward.in_step(7)[1]["kill"] and forward.in_step(2)[0]
    assert Faults({"exit_after_save": 6}, rank=3).exit_after_save(6)
    none = Faults(None, rank=0)
    assert none.in_step(0) == (False, {"kill": False, "nan_grad": False, "raise": False})
    assert none.crash_save is None and not none.exit_after_save(1)
