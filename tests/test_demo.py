"""The demo's own config (``configs/demo.yaml``: synthesized corpora, the 3-layer Fbank recipe,
iteration 2 from iteration 1's backbone at equal k, held-out probes and PNMI) end to end at
reduced size: a corpus of minutes and a few steps per iteration. The full measurement is
``experiments/demo_gain.py``.

CI runs the README's ``make demo`` itself, into an empty folder, before the suite, and names
that folder in ``PRETRAIN_DEMO_RUN`` (its console output beside it, ``<folder>.log``): the test
then checks that full run instead of running a reduced one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.long]
REPO = Path(__file__).resolve().parents[1]


def reduced_demo(tmp_path: Path) -> tuple[Path, str]:
    run = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pretrain.cli", "iterate", "--config", str(REPO / "configs/demo.yaml"),
           f"run_dir={run}", "corpus.synth_hours=0.02", "corpus.synth_max_clauses=1", "eval.synth_hours=0.03",
           "corpus.per_shard=16", "iterations.0.max_steps=4", "iterations.1.max_steps=4",
           "train_overrides=[optim.warmup_steps=1,checkpoint.every=2,log.every=1]",
           "eval.probe_overrides=[phone.epochs=2,phone.ctc_epochs=1,speaker.epochs=10]"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return run, done.stderr


def test_the_demo_config_reports_its_verdict(tmp_path):
    given = os.environ.get("PRETRAIN_DEMO_RUN")
    run, output = (Path(given), Path(given + ".log").read_text()) if given else reduced_demo(tmp_path)
    names = [p.stem for p in (run / "stages").glob("*.json")]
    assert {"corpus", "eval.corpus", "it1.heldout", "it2.heldout", "it2.train", "it2.probe"} <= set(names)
    assert "export" not in names and "it2.mfcc_kmeans" not in names  # Fbank: no export; equal k: no MFCC refit
    assert "backbone from" in output  # iteration 2 continued iteration 1's backbone

    report = (run / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Time per stage")
    verdict = next(line for line in report.splitlines() if line.startswith("On held-out speech"))
    mfcc = json.loads((run / "it1/heldout/quality.json").read_text())["pnmi"]
    it2 = json.loads((run / "it2/heldout/quality.json").read_text())["pnmi"]
    assert f"on held-out PNMI: {it2:.3f} vs {mfcc:.3f}" in verdict
    assert "comparisons held" in verdict and "(b) the iteration-2 model" in verdict
    assert (run / "report/verdict.png").stat().st_size > 5000
    # The committed reference curves of the full demo are drawn behind the run's own.
    assert "Faint lines: the reference run 'demo'" in report
    # kNN-VC runs in every probe stage, between held-out voices, and joins the report's table.
    probe = json.loads((run / "it2/probe/probe.json").read_text())
    layer = probe["rows"]["model"]["layers"]["1"]
    assert 0 < layer["knnvc_content"] <= 100 and layer["knnvc_pairs"] >= 1
    first = json.loads((run / "it1/probe/probe.json").read_text())
    assert "knnvc_target_audio" in first["rows"]["mfcc"]["layers"]["0"]
    assert "kNN-VC same phone (%)" in report
