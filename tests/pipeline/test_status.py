"""`pretrain status` on a training run directory (the iterate view is exercised on a real run in
tests/pipeline/test_iterate.py)."""

from __future__ import annotations

import json
import os
import time

from pretrain.stages import execute


def test_status_of_a_training_run_as_table_and_json(tmp_path, capsys):
    run = tmp_path / "train"
    (run / "checkpoints" / "step_8.bad").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_6\n")
    (run / "config.yaml").write_text("optim:\n  max_steps: 20\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "acc_masked": s / 100,
                                                           "audio_s_per_s": 90.0, "step_time_s": 1.5}) + "\n"
                                               for s in (2, 4, 6)))
    assert execute(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    train = status["train"]
    assert status["kind"] == "train" and train["step"] == 6 and train["max_steps"] == 20
    assert train["eta_s"] == 14 * 1.5 and train["checkpoint"] == "step_6" and train["quarantined"] == ["step_8.bad"]
    assert not train["running"]
    assert execute(["status", str(run)]) == 0
    table = capsys.readouterr().out
    assert "(train, not running): step 6/20, loss 4.400, masked acc 0.060, 90 audio-s/s, ETA 0m21s" in table
    assert execute(["status", str(tmp_path / "nothing")]) == 1


def test_a_running_training_without_new_steps_is_stalled(tmp_path, capsys):
    from pretrain.lifecycle import RunLock

    run = tmp_path / "train"
    run.mkdir()
    (run / "config.yaml").write_text("optim:\n  max_steps: 20\nlog:\n  every: 2\n")
    metrics = run / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 6, "loss": 4.0, "step_time_s": 1.5}) + "\n")
    lock = RunLock(run, "pretrain train").acquire()
    try:
        assert execute(["status", str(run)]) == 0
        assert "(train, running): step 6/20, loss 4.000, ETA 0m21s" in capsys.readouterr().out
        # 10 minutes without a line, where one comes every 3 s: stalled, and no ETA.
        old = time.time() - 600
        os.utime(metrics, (old, old))
        assert execute(["status", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["train"]["stalled_s"] >= 600
        assert execute(["status", str(run)]) == 0
        out = capsys.readouterr().out
        assert "(train, stalled): step 6/20, loss 4.000, STALLED: no step logged for 10m" in out and "ETA" not in out
    finally:
        lock.release()
    # Not held: a run that stopped is not stalled, whatever the age of its last line.
    assert execute(["status", str(run)]) == 0
    assert "(train, not running)" in capsys.readouterr().out


def test_a_damaged_stage_record_or_config_is_one_line_naming_the_file(tmp_path, capsys):
    from pathlib import Path

    from pretrain.config import load_config, write_run_record
    from pretrain.config.iterate import IterateConfig

    repo = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    write_run_record(run, load_config(IterateConfig, [repo / "configs/demo.yaml"], [f"run_dir={run}"]))
    (run / "stages").mkdir()
    assert execute(["status", str(run)]) == 0
    capsys.readouterr()
    for text in ("", '{"attempts": [{"started": '):  # empty, cut short
        (run / "stages/corpus.json").write_text(text)
        assert execute(["status", str(run)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pretrain status: error: stage record {run / 'stages/corpus.json'} is damaged")
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    (run / "stages/corpus.json").unlink()
    (run / "config.yaml").write_text("iterations: 3\n")
    assert execute(["status", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pretrain status: error:") and "iterations" in err and "Traceback" not in err
