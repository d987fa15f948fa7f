"""docs/your_data.md, run: every command of its ``bash`` blocks, in order, on a LibriSpeech-shaped
tree of synthetic speech, with ``CORPUS`` and ``WORK`` pointing there. Two lines are not
pretrain's and are stood in for: ``mfa align`` (the Montreal Forced Aligner is not installed
here) writes, in MFA's layout and ARPAbet with stress, the TextGrids of the corpus's own phone
alignments; and the training of ``pretrain iterate`` gets tiny-size overrides after the
command as written (one update per iteration on CPU)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.phones import PHONES

from tests.test_configs import TINY

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "your_data.md"
textgrid = pytest.importorskip("praatio.textgrid")


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def stand_in_for_mfa(corpus: Path, out: Path) -> None:
    """What ``mfa align`` writes: ``out/<path of the audio below the corpus>.TextGrid`` with a
    ``phones`` tier in ARPAbet, vowels with a stress digit, silence as empty intervals."""
    alignments = json.loads((corpus / "alignments.json").read_text())
    for key, path in alignments.items():
        align = json.loads(Path(path).read_text())
        sr = align["sample_rate"]
        spoken = [(s / sr, e / sr, p.upper() + ("1" if p[0] in "aeiou" else "")) for p, s, e in align["segments"]
                  if p != "sil"]
        grid = textgrid.Textgrid()
        grid.addTier(textgrid.IntervalTier("phones", spoken, 0, align["num_samples"] / sr))
        target = out / f"{key}.TextGrid"
        target.parent.mkdir(parents=True, exist_ok=True)
        grid.save(str(target), format="long_textgrid", includeBlankSpaces=True)


def test_the_guide_names_what_the_test_runs():
    lines = commands()
    assert lines[0].startswith("export CORPUS=") and any(c.startswith("mfa align") for c in lines)
    assert [c.split()[1] for c in lines if c.startswith("pretrain")] == [
        "shards", "shards", "shards", "labels", "iterate", "iterate", "status"]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.multiprocess
def test_every_command_of_the_guide_runs_on_a_librispeech_shaped_tree(librispeech_tree, tmp_path):
    env = {**os.environ, "CORPUS": str(librispeech_tree / "train-960"), "WORK": str(tmp_path / "work"),
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PRETRAIN_FAULT", None)
    work = tmp_path / "work"
    per_iteration = [f"iterations.{i}.train_overrides=[{','.join(TINY)}]" for i in (0, 1)]
    tiny = ["nproc=1", "jobs=1", "iterations.0.k=5", "iterations.0.fraction=1.0", "iterations.0.max_frames=20000",
            "iterations.0.max_steps=1", "iterations.1.k=5", "iterations.1.layer=1", "iterations.1.fraction=1.0",
            "iterations.1.max_frames=20000", "iterations.1.max_steps=1", "eval.probes=phone,speaker,pnmi",
            "eval.probe_overrides=[phone.epochs=3,phone.ctc_epochs=1,speaker.epochs=5]", *per_iteration]
    outputs = []
    for line in commands():
        if line.startswith("export "):
            continue  # the test's own CORPUS and WORK stand for them
        if line.startswith("mfa align"):
            stand_in_for_mfa(librispeech_tree / "train-960", work / "mfa")
            continue
        argv = shlex.split(line)
        if argv[:2] == ["pretrain", "iterate"] and "--dry-run" not in argv:
            argv += [*tiny, "--no-progress"]
        proc = subprocess.run(["bash", "-c", " ".join(shlex.quote(a) if "$" not in a else a for a in argv)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=1500)
        assert proc.returncode == 0, (line, proc.stdout[-3000:], proc.stderr[-5000:])
        outputs.append(proc.stdout)

    train = json.loads((work / "shards/train/manifest.json").read_text())
    heldout = json.loads((work / "shards/heldout/manifest.json").read_text())
    assert train["totals"]["utterances"] + heldout["totals"]["utterances"] == 40
    meta = json.loads((work / "shards/heldout/labels/phones50/meta.json").read_text())
    assert meta["num_classes"] == len(PHONES)
    run = work / "runs/base"
    probe = json.loads((run / "it2/probe/probe.json").read_text())
    assert {"phone_acc", "speaker_acc", "pnmi"} <= set(json.dumps(probe["best"]).replace('"', " ").split())
    quality = json.loads((run / "it1/heldout/quality.json").read_text())  # held-out PNMI
    assert 0 < quality["pnmi"] < 1
    assert "it2.train" in outputs[-1] and "done" in outputs[-1]  # pretrain status
    assert (run / "report.md").read_text().startswith("#")

    # The dashboards (docs/iterate.md): each iteration's label quality and probe table went into
    # its training's wandb run (tables, scalars on the iteration axis, the report's plots with
    # the last one) and TensorBoard (scalars at the training's last step) ...
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train.wandb_records import records

    def history(train: Path) -> dict[str, str]:
        items = {}
        for path in sorted(train.glob("wandb/offline-run-*/run-*.wandb")):
            for r in records(path):
                if r.WhichOneof("record_type") == "history":
                    items.update({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
        return items

    for i in (1, 2):
        train = run / f"it{i}" / "train"
        logged = history(train)
        assert float(logged["labels/heldout/pnmi"]) == pytest.approx(
            json.loads((run / f"it{i}/heldout/quality.json").read_text())["pnmi"])
        assert json.loads(logged["probes/_type"]) == json.loads(logged["label_quality/_type"]) == "table-file"
        assert ("report/verdict/_type" in logged) == (i == 2)
        events = EventAccumulator(str(train / "tensorboard")).Reload()
        assert [e.step for e in events.Scalars("labels/heldout/pnmi")] == [1]
    # The final models and the centroids as artifacts (log.wandb_artifacts in the guide's command),
    # each in its training's run.
    for i in (1, 2):
        train = run / f"it{i}" / "train"
        run_id = (train / "wandb_id").read_text().strip()
        logged = {r.artifact.name: r.artifact for path in sorted(train.glob("wandb/offline-run-*/run-*.wandb"))
                  for r in records(path) if r.WhichOneof("record_type") == "artifact"
                  and r.artifact.type in ("model", "kmeans")}  # wandb stores the tables as artifacts too
        assert set(logged) == {f"model-{run_id}", f"kmeans-{run_id}"}, logged
        kmeans = logged[f"kmeans-{run_id}"]
        assert kmeans.type == "kmeans" and sorted(kmeans.aliases) == [f"it{i}", "latest"]
        assert {e.path for e in kmeans.manifest.contents} == {"centroids.npy", "kmeans.json"}
        assert json.loads(kmeans.metadata)["centroids_sha256"] == json.loads(
            (run / f"it{i}/kmeans/kmeans.json").read_text())["centroids_sha256"]
    # ... and a rerun, with nothing left to do, logs nothing twice.
    before = sorted(run.glob("it*/train/wandb/offline-run-*"))
    argv = shlex.split(commands()[-2]) + tiny + ["--no-progress"]
    rerun = subprocess.run(["bash", "-c", " ".join(shlex.quote(a) if "$" not in a else a for a in argv)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert rerun.returncode == 0 and "everything was done" in rerun.stdout, rerun.stderr[-3000:]
    assert sorted(run.glob("it*/train/wandb/offline-run-*")) == before
