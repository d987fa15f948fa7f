from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import yaml
from omegaconf import MISSING

from pretrain import __version__
from pretrain.config import ConfigError, field_docs, iter_fields, load_config, to_yaml, write_run_record
from pretrain.config.corpus import CorpusSynthConfig


@dataclass
class Optim:
    lr: float = 5e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"must be > 0, got {self.lr}", field="lr")


@dataclass
class Toy:
    name: str = MISSING
    """Run name."""
    steps: int = 10
    """Training steps."""
    optim: Optim = field(default_factory=Optim)
    """Optimizer settings."""


def write(path, text):
    path.write_text(text)
    return path


def test_merge_order_defaults_then_files_then_overrides(tmp_path):
    a = write(tmp_path / "a.yaml", "name: from-a\nsteps: 20\noptim: {lr: 1.0}\n")
    b = write(tmp_path / "b.yaml", "steps: 30\n")
    cfg = load_config(Toy, [a, b], ["optim.lr=2.0"])
    assert cfg.name == "from-a"  # only a sets it
    assert cfg.steps == 30  # b wins over a
    assert cfg.optim.lr == 2.0  # command line wins over a
    assert cfg.optim.betas == [0.9, 0.98]  # nobody sets it: dataclass default
    assert isinstance(cfg, Toy) and isinstance(cfg.optim, Optim)


def test_unknown_key_in_file_names_file_field_and_suggestion(tmp_path):
    a = write(tmp_path / "a.yaml", "name: x\nstesp: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Toy, [a])
    assert e.value.field == "stesp"
    assert e.value.source == str(a)
    assert "did you mean 'steps'" in str(e.value)


def test_unknown_nested_key_on_command_line_suggests_dotted_path():
    with pytest.raises(ConfigError) as e:
        load_config(Toy, [], ["name=x", "optim.lrr=1"])
    assert e.value.field == "optim.lrr"
    assert e.value.source == "command line"
    assert "did you mean 'optim.lr'" in str(e.value)


def test_unknown_key_without_close_match_lists_valid_fields():
    with pytest.raises(ConfigError, match="valid fields here: name, steps, optim"):
        load_config(Toy, [], ["name=x", "zzzzzz=1"])


@pytest.mark.parametrize("override, key", [("steps=abc", "steps"), ("steps=2.5", "steps"),
                                           ("optim.lr=fast", "optim.lr"), ("optim.betas=3", "optim.betas")])
def test_wrong_type_names_the_field(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, [], ["name=x", override])
    assert e.value.field == key


def test_validate_errors_carry_the_nested_path():
    with pytest.raises(ConfigError) as e:
        load_config(Toy, [], ["name=x", "optim.lr=-1"])
    assert e.value.field == "optim.lr"
    assert "must be > 0" in str(e.value)


def test_missing_required_field():
    with pytest.raises(ConfigError) as e:
        load_config(Toy)
    assert e.value.field == "name"
    assert "required" in str(e.value)


@pytest.mark.parametrize("bad", ["steps", "=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Toy, [], ["name=x", bad])


def test_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(Toy, [tmp_path / "nope.yaml"])
    assert "nope.yaml" in str(e.value)
    lst = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping") as e:
        load_config(Toy, [lst])
    assert e.value.source == str(lst)
    broken = write(tmp_path / "broken.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Toy, [broken])


def test_empty_yaml_file_changes_nothing(tmp_path):
    cfg = load_config(Toy, [write(tmp_path / "e.yaml", "")], ["name=x"])
    assert cfg.steps == 10


def test_field_docs_are_read_from_source():
    assert field_docs(Toy) == {"name": "Run name.", "steps": "Training steps.",
                               "optim": "Optimizer settings."}
    paths = [p for p, _, _ in iter_fields(Toy)]
    assert paths == ["name", "steps", "optim", "optim.lr", "optim.betas"]


def test_yaml_dump_has_docs_and_round_trips(tmp_path):
    cfg = load_config(Toy, [], ["name=x", "optim.lr=0.25", "steps=7"])
    text = to_yaml(cfg)
    assert "# Peak learning rate." in text and "# Training steps." in text
    again = load_config(Toy, [write(tmp_path / "dump.yaml", text)])
    assert again == cfg
    assert yaml.safe_load(text) == dataclasses.asdict(cfg)


def test_run_record_has_config_version_and_command(tmp_path):
    cfg = load_config(Toy, [], ["name=x"])
    write_run_record(tmp_path / "run", cfg, ["pretrain", "toy", "name=x"])
    assert load_config(Toy, [tmp_path / "run" / "config.yaml"]) == cfg
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["pretrain_version"] == __version__
    assert record["command"] == ["pretrain", "toy", "name=x"]
    assert record["schema"].endswith("Toy")
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_corpus_config_values_are_validated():
    base = ["out=/tmp/x"]
    with pytest.raises(ConfigError, match="exactly one of 'count' and 'hours'"):
        load_config(CorpusSynthConfig, [], base)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(CorpusSynthConfig, [], base + ["count=3", "hours=1"])
    with pytest.raises(ConfigError) as e:
        load_config(CorpusSynthConfig, [], base + ["count=0"])
    assert e.value.field == "count"
    with pytest.raises(ConfigError, match="unknown voice 'festival-xyz'") as e:
        load_config(CorpusSynthConfig, [], base + ["count=3", "voices=[festival-xyz]"])
    assert e.value.field == "voices"
    with pytest.raises(ConfigError) as e:
        load_config(CorpusSynthConfig, [], base + ["count=3", "edge_silence=[0.3,0.1]"])
    assert e.value.field == "edge_silence"
    cfg = load_config(CorpusSynthConfig, [], base + ["count=3", "voices=[flite-awb,espeak-f2]"])
    assert cfg.voices == ["flite-awb", "espeak-f2"]


def test_a_config_or_record_the_project_did_not_write_is_never_replaced(tmp_path):
    from pretrain.config import write_run_record
    from pretrain.config.train import TrainConfig
    from pretrain.utils import PretrainError

    cfg = load_config(TrainConfig, [], [f"run_dir={tmp_path}", "data.shards=x", "data.labels=[km]"])
    for name, text in (("config.yaml", "my: own\n"), ("run.json", '{"mine": true}')):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text(text)
        with pytest.raises(PretrainError, match=rf"{name} exists and was not written by pretrain"):
            write_run_record(folder, cfg)
        assert (folder / name).read_text() == text and len(list(folder.iterdir())) == 1
    # Its own records, and an empty or fresh folder, are written (and rewritten) as before.
    write_run_record(tmp_path / "fresh", cfg)
    write_run_record(tmp_path / "fresh", cfg)
    assert (tmp_path / "fresh/config.yaml").is_file()
