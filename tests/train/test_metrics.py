"""metrics.jsonl after a crash: a torn last line is cut before appending, and readers skip
lines that are not JSON instead of failing every later report."""

from __future__ import annotations

import json

from pretrain.config.train import LogConfig
from pretrain.pipeline.report import read_metrics
from pretrain.train.metrics import MetricsLogger, read_jsonl


def test_a_torn_last_line_is_repaired_on_reopen_and_tolerated_by_readers(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" + '{"step": 2, "lo')
    with caplog.at_level("WARNING"):
        logger = MetricsLogger(tmp_path, LogConfig(wandb="disabled", tensorboard=False), config={})
    logger.log(2, {"loss": 4.0})
    logger.close()
    assert "ended in a torn line" in caplog.text
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert path.read_text().count("\n") == 2
    # A torn line in the middle (a file copied mid-write) is skipped by the report's reader.
    path.write_text(json.dumps({"step": 1, "loss": 5.0}) + '\n{"step": 2, "lo\n' + json.dumps({"step": 3, "loss": 3.0}) + "\n")
    with caplog.at_level("WARNING"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]
    assert "line 2 is not JSON" in caplog.text
