import os
import stat

from pretrain.utils import atomic_write_bytes, atomic_write_json


def test_atomic_writes_honour_the_umask(tmp_path):
    # Teammates share shards and checkpoints: a 0600 file (mkstemp's mode) locks them out.
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.bin", "sub/b.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_credentials_are_redacted_from_records_and_ordinary_words_are_not(tmp_path):
    import json

    from pretrain.config import load_config, write_run_record
    from pretrain.config.slurm import SlurmProfile
    from pretrain.utils import redact

    assert redact("export WANDB_API_KEY=abc123; export X=1") == "export WANDB_API_KEY=<redacted>; export X=1"
    assert redact('export HF_TOKEN="a b" && run') == "export HF_TOKEN=<redacted> && run"
    assert redact("mysql --password hunter2 --api-key=k") == "mysql --password <redacted> --api-key=<redacted>"
    for plain in ("module load cuda/12.4", "sort --key 2", "monkey=1", "source /x/keys.sh", "num_keys: 3"):
        assert redact(plain) == plain
    assert redact({"api_key": "x", "tokenizer": "bpe", "setup": ["export SECRET=1"]}) == \
        {"api_key": "<redacted>", "tokenizer": "bpe", "setup": ["export SECRET=<redacted>"]}
    # The record of a command line that carried one (and a config with one in it).
    cfg = load_config(SlurmProfile, [], ["setup=[export WANDB_API_KEY=abc123]"])
    write_run_record(tmp_path, cfg, ["launch", "slurm", "--set", "setup=[export WANDB_API_KEY=abc123]"])
    assert "abc123" not in (tmp_path / "run.json").read_text() + (tmp_path / "config.yaml").read_text()
    assert "WANDB_API_KEY=<redacted>" in json.loads((tmp_path / "run.json").read_text())["command"][3]
