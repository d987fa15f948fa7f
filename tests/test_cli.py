from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.cli import main
from pretrain.stages import STAGES
from pretrain.config import iter_fields

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = Path(sys.executable).parent / "pretrain"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(PRETRAIN), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_top_level_help_lists_every_stage():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for stage in STAGES:
        assert stage.group in proc.stdout


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{s.group}-{s.name}")
def test_stage_help_lists_every_config_field(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage.group, *([stage.name] if stage.name else []), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for path, _, doc in iter_fields(stage.config_class()):
        assert path in out
        assert doc.split()[0] in out


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{s.group}-{s.name}")
def test_every_config_field_has_a_docstring(stage):
    undocumented = [path for path, _, doc in iter_fields(stage.config_class()) if not doc.strip()]
    assert undocumented == []


def test_config_error_exits_2_naming_the_field(tmp_path, capsys):
    code = main(["corpus", "synth", "--out", str(tmp_path / "c"), "cuont=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "field 'cuont'" in err and "did you mean 'count'" in err
    assert not (tmp_path / "c").exists()  # nothing was started


def test_print_config_merges_files_flags_and_overrides(capsys):
    code = main(["corpus", "synth", "--config", str(REPO / "configs/corpus/tiny.yaml"),
                 "--out", "some dir: with colon", "--seed", "5", "jobs=1", "--print-config"])
    assert code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["out"] == "some dir: with colon"
    assert cfg["count"] == 11 and cfg["max_clauses"] == 1  # from tiny.yaml
    assert cfg["seed"] == 5 and cfg["jobs"] == 1


@pytest.mark.slow
def test_corpus_synth_end_to_end_writes_run_record(tmp_path):
    out = tmp_path / "corpus"
    proc = run_cli("corpus", "synth", "--config", "configs/corpus/tiny.yaml", "--out", str(out),
                   "count=3", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 utterances" in proc.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["command"][:3] == ["pretrain", "corpus", "synth"]
    assert yaml.safe_load((out / "config.yaml").read_text())["count"] == 3
    # A second run into the same directory refuses to clobber it, with a clear message.
    again = run_cli("corpus", "synth", "--out", str(out), "count=3", "--no-progress")
    assert again.returncode == 1
    assert "not empty" in again.stderr and "overwrite=true" in again.stderr


def test_the_layering_has_no_back_arrows():
    """Config schemas import no implementation, the registry does not import iterate (which
    runs stages through it), and the entry point imports nothing heavy before set-up."""
    import subprocess
    import sys

    probe = ("import sys, pretrain.config.corpus, pretrain.config.iterate, pretrain.config.train, pretrain.stages, "
             "pretrain.cli; print(sorted(m for m in sys.modules if m.startswith(('pretrain.corpus', "
             "'pretrain.pipeline', 'pretrain.commands', 'torch', 'deepspeed'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_faiss_loader_messages_stay_off_the_console(tmp_path, capsys):
    import logging

    from pretrain.stages import execute

    execute(["status", str(tmp_path / "nothing")])
    assert logging.getLogger("faiss.loader").getEffectiveLevel() == logging.WARNING
    import faiss  # noqa: F401 - its loader's INFO lines would be printed here

    assert "swigfaiss" not in capsys.readouterr().err


def test_an_unexpected_exception_is_called_a_bug_with_its_traceback(monkeypatch, tmp_path, capsys):
    import pretrain.pipeline.status as status
    from pretrain.stages import execute

    def broken(run_dir):
        raise KeyError("boom")

    monkeypatch.setattr(status, "run_status", broken)
    assert execute(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "pretrain status: internal error (a bug in pretrain" in err
    assert err.strip().splitlines()[-1].endswith("KeyError: 'boom'")
