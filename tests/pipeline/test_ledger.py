"""The golden records: stage records that earlier versions of pretrain wrote must keep reading
as unchanged after any change to any config schema, so that upgrading never invalidates (and
deletes) a finished run. ``tests/assets/golden_run`` holds the records of a whole ``make demo``
run (18 stages) as the commit named in its README wrote them, with the run's config and the
training config file it used."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.config.iterate import IterateConfig
from pretrain.pipeline import ledger
from pretrain.pipeline.plan import plan

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden_run"


def _plan(run: Path) -> list:
    return plan(load_config(IterateConfig, [GOLDEN / "config.yaml"],
                            [f"run_dir={run}", f"train_configs=[{GOLDEN / 'small_cpu.yaml'}]"]), create_identity=False)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, list]:
    """The golden run planned with its own config (once: the records are put back per test)."""
    run = tmp_path_factory.mktemp("golden") / "run"
    return run, _plan(run)


def golden_run(planned) -> tuple[Path, list]:
    """The golden records in their run folder, as the earlier version left them."""
    run, stages = planned
    shutil.rmtree(run / "stages", ignore_errors=True)
    shutil.copytree(GOLDEN / "stages", run / "stages")
    return run, stages


def test_records_of_earlier_versions_read_as_unchanged_and_are_rewritten_in_todays_form(planned):
    run, stages = golden_run(planned)
    assert len(stages) == len(list((GOLDEN / "stages").glob("*.json"))) == 18
    current = ledger.unchanged(run, stages)
    assert [name for name, record in current.items() if record is None] == []
    assert ledger.invalidate_changed(run, stages) == []
    for stage in stages:  # rewritten with today's fingerprint; the attempts kept
        record = json.loads(ledger.record_path(run, stage.name).read_text())
        golden = json.loads((GOLDEN / "stages" / f"{stage.name}.json").read_text())
        assert record["fingerprint"] == stage.fingerprint and record["attempts"] == golden["attempts"]
    # Read again, the rewritten records match by fingerprint alone.
    assert all(ledger.read_record(run, s.name)["fingerprint"] == s.fingerprint for s in _plan(run))


def _leaves(config: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


def _drop(config: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for parent in parents:
        config = config[parent]
    del config[leaf]


@pytest.mark.parametrize("seed", range(2))
def test_a_field_added_later_at_its_default_changes_nothing_and_any_other_change_invalidates(planned, seed):
    """What a schema change looks like to an old record: today's config has a field the record
    lacks. At its default it reads as the same stage; a record that differs in a value is
    changed, and so is everything downstream of it."""
    run, stages = golden_run(planned)
    rng = random.Random(seed)
    by_name = {s.name: s for s in stages}
    dropped = 0
    for stage in stages:  # each record loses a field that is at its default today
        path = ledger.record_path(run, stage.name)
        record = json.loads(path.read_text())
        at_default = [k for k in _leaves(stage.config) if _value(stage.defaults, k) == _value(stage.config, k)
                      and _value(record["config"], k) is not KeyError]
        if at_default:
            _drop(record["config"], rng.choice(at_default))
            dropped += 1
        path.write_text(json.dumps({**record, "fingerprint": "0" * 64}))
    assert dropped >= 12  # nearly every stage has such a field
    assert ledger.invalidate_changed(run, stages, delete=False) == []

    changed = by_name["it1.kmeans"]
    path = ledger.record_path(run, changed.name)
    record = json.loads(path.read_text())
    record["config"]["k"] = 99
    path.write_text(json.dumps(record))
    stale = ledger.invalidate_changed(run, stages, delete=False)
    assert stale[0] == "it1.kmeans" and "it2.train" in stale and "it1.features" not in stale


def _value(config: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return KeyError
        config = config[part]
    return config
