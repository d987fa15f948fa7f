"""The trainer's objective interface and its fault hooks: the loop names no objective, and each
hook fires exactly at its point (the multi-process tests in test_train.py and test_fail_fast.py
run them for real)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pretrain.train.faults import Faults
from pretrain.train.objectives import OBJECTIVES, Data2VecObjective, Objective, objective_for
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
    named = {w for w in words if any(n in w for n in ("data2vec", "hubert", "teacher", "ema_", "emateacher"))}
    assert named <= {"hubertpretrain"}, named  # the model class's name, shared by every objective


def test_each_objective_is_found_by_its_config_name():
    assert type(objective_for(cfg())) is Objective
    assert type(objective_for(cfg("model.objective=data2vec", "data.labels=[]", "model.data2vec.top_k_layers=2"))) \
        is Data2VecObjective
    assert set(OBJECTIVES) == {"hubert", "data2vec"}


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
