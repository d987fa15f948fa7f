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
    from omegaconf import OmegaConf

    from pretrain.config.core import is_missing

    defaults = OmegaConf.structured(stage.config_class())
    for path, _, doc in iter_fields(stage.config_class()):
        assert path in out
        assert doc.split()[0] in out
        # nested ones too (data.shards of train was shown as null)
        assert (f"  {path} = (required)" in out) == is_missing(defaults, path), path


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


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{s.group}-{s.name}")
def test_print_template_shows_every_field_and_marks_the_required_ones(stage, capsys):
    """A template is what a user starts a config file from: it parses as YAML, holds every
    field, marks exactly the fields without a default, and given back unchanged is refused as
    missing one of them (never taken as the string '???')."""
    from omegaconf import OmegaConf

    from pretrain.config.core import is_missing

    command = [stage.group, *([stage.name] if stage.name else [])]
    assert main([*command, "--print-template"]) == 0
    text = capsys.readouterr().out
    template = yaml.safe_load(text)
    defaults = OmegaConf.structured(stage.config_class())
    required = {path for path, _, _ in iter_fields(stage.config_class()) if is_missing(defaults, path)}
    for path, _, _ in iter_fields(stage.config_class()):
        node = template
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, path
            node = node[key]
    marked = [line.split(":")[0].strip() for line in text.splitlines() if line.endswith("# REQUIRED")]
    assert sorted(marked) == sorted(p.rsplit(".", 1)[-1] for p in required)
    if required:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"template-{os.getpid()}.yaml"
        path.write_text(text)
        assert main([*command, "--config", str(path), "--print-config"]) == 2
        assert "is required but has no value" in capsys.readouterr().err
        path.unlink()


def test_version_and_a_log_level_after_the_stage(tmp_path):
    assert run_cli("--version").stdout.strip() == "pretrain 0.1.0"
    launch = subprocess.run([str(PRETRAIN.parent / "launch"), "--version"], capture_output=True, text=True)
    assert launch.returncode == 0 and launch.stdout.strip() == "launch (pretrain 0.1.0)"
    quiet = run_cli("status", str(tmp_path / "none"), "--log-level", "DEBUG")
    assert quiet.returncode == 1 and "faiss.loader" not in quiet.stderr  # accepted; the error is the run's
    bad = run_cli("status", str(tmp_path / "none"), "--log-level", "LOUD")
    assert bad.returncode == 2 and "invalid choice: 'LOUD'" in bad.stderr


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


RECORDS = {  # command -> does it leave config.yaml and run.json in its output folder?
    "corpus synth": True, "corpus noise": True, "shards build": True, "features mfcc": True,
    "features model": True, "kmeans fit": True, "kmeans quality": True, "train": True, "probe": True, "knnvc": True,
    "iterate": True,
    # Read-only:
    "shards verify": False, "status": False,
    # Their output is not a folder of their own: a label set inside the shards (its meta.json
    # records who made it), fairseq's files in the user's folder, one model file, a
    # transformers folder (pretrain_export.json names its source).
    "kmeans assign": False, "labels import": False, "labels alignments": False, "labels export": False,
    "import hf": False, "import fairseq": False, "export hf": False,
}


def test_the_table_of_run_records_covers_every_command():
    """docs/command.md gives this table; a new command must be placed in it."""
    assert set(RECORDS) == {" ".join(filter(None, (s.group, s.name))) for s in STAGES}


def test_commands_with_an_output_folder_leave_their_run_record(small_shards, tmp_path):
    """What the table says, for the commands quick enough to run here (train, probe and iterate
    are checked by their own tests; corpus synth by tests/corpus/test_synth.py)."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    outs = {
        "features mfcc": (["features", "mfcc", "--shards", str(shards), "--out", str(tmp_path / "f"),
                           "fraction=0.5", "--no-progress"], tmp_path / "f"),
        "kmeans fit": (["kmeans", "fit", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "k"), "--k", "5",
                        "--no-progress"], tmp_path / "k"),
        "kmeans assign": (["kmeans", "assign", "--shards", str(shards), "--kmeans", str(tmp_path / "k"),
                           "--name", "km5", "--no-progress"], shards / "labels" / "km5"),
        "kmeans quality": (["kmeans", "quality", "--shards", str(shards), "labels=km5", "reference=phones100",
                            f"out={tmp_path / 'q'}", "--no-progress"], tmp_path / "q"),
        "labels export": (["labels", "export", "--shards", str(shards), "--name", "km5", "--out",
                           str(tmp_path / "fs")], tmp_path / "fs"),
    }
    for command, (argv, out) in outs.items():
        assert main(argv) == 0, command
        assert out.is_dir(), command
        assert ((out / "config.yaml").is_file() and (out / "run.json").is_file()) == RECORDS[command], command
