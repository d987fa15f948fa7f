"""``pretrain iterate`` end to end: two iterations on the tiny corpus (11 utterances), 2 training processes,
then a rerun that does nothing, an interruption inside iteration 2's training, and a config
change that invalidates only what depends on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.utils import PretrainError

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
REPO = Path(__file__).resolve().parents[2]


def OVERRIDES(run: Path, corpus: Path, eval_shards: Path) -> list[str]:
    return [f"run_dir={run}", "corpus.synth_hours=null", f"corpus.input={corpus}", "corpus.per_shard=2",
            "iterations.0.k=20", "iterations.0.max_steps=4", "iterations.1.k=30", "iterations.1.max_steps=4",
            # The tiny waveform model, so that the export to transformers is exercised too (the
            # demo's own Fbank model is run by tests/test_demo.py).
            f"train_configs=[{REPO / 'configs/model/tiny.yaml'},{REPO / 'configs/train/tiny_cpu.yaml'}]", "export=true",
            "train_overrides=[log.every=1,checkpoint.every=2,data.max_tokens=40000,optim.warmup_steps=1]",
            "eval.synth_hours=null", f"eval.shards={eval_shards}",
            # 3 utterances of each of the 11 voices: one per split
            "eval.probe_overrides=[max_utterances=33,phone.epochs=2,phone.ctc_epochs=1,speaker.epochs=10,pnmi_k=20]"]


def iterate(run: Path, corpus: Path, eval_shards: Path, *overrides: str,
            fault: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    env.pop("PRETRAIN_FAULT", None)
    if fault:
        env["PRETRAIN_FAULT"] = json.dumps(fault)
        env["PRETRAIN_FAULT_STAGE"] = "it2.train"
    cmd = [sys.executable, "-m", "pretrain.cli", "iterate", "--config", str(REPO / "configs/demo.yaml"),
           *OVERRIDES(run, corpus, eval_shards), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


@pytest.mark.long
def test_two_iterations_rerun_interruption_and_invalidation(tiny_corpus, small_shards, tmp_path, caplog):
    import transformers

    from pretrain.cluster.kmeans import load_kmeans
    from pretrain.data.labels import LabelSet
    from pretrain.data.shards import read_manifest
    from pretrain.model.checkpoint import load_model

    run = tmp_path / "run"
    # First attempt: rank 1 is killed in the middle of iteration 2's training.
    first = iterate(run, tiny_corpus, small_shards, fault={"kill_at": 3, "rank": 1})
    assert first.returncode != 0
    assert "stage it2.train failed" in first.stderr, first.stderr[-3000:]
    assert (run / "it2/train/checkpoints/latest").read_text().strip() == "step_2"
    # `pretrain status` tells where it stopped.
    from pretrain.pipeline.status import format_status, run_status

    status = json.loads(json.dumps(run_status(run)))  # what `pretrain status RUN --json` prints
    states = {row["name"]: row["state"] for row in status["stages"]}
    assert states["it1.train"] == "done" and states["it2.train"] == "failed" and states["export"] == "pending"
    assert status["iterations"][1]["train"]["checkpoint"] == "step_2" and not status["running"]
    assert 0 < status["iterations"][0]["pnmi_quality"] < 1
    # Second attempt resumes it: the finished stages are skipped, training continues at step 2.
    second = iterate(run, tiny_corpus, small_shards)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "3 stages run (it2.train, it2.probe, export), 15 skipped" in second.stdout
    assert "resumed from step 2" in second.stderr
    steps = [json.loads(line)["step"] for line in (run / "it2/train/metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert sorted(set(steps)) == list(range(1, 5))

    # Every artifact exists and loads.
    shards = run / "shards"
    assert read_manifest(shards)["totals"]["utterances"] == 11
    for i, k, rate in ((1, 20, 100), (2, 30, 50)):
        centroids, meta = load_kmeans(run / f"it{i}/kmeans")
        assert centroids.shape[0] == k
        labels = LabelSet(shards, f"it{i}_km{k}")
        assert labels.num_classes == k and labels.label_rate == rate
        quality = json.loads((run / f"it{i}/quality/quality.json").read_text())
        assert 0 < quality["pnmi"] < 1
        model = load_model(run / f"it{i}/train/checkpoints/step_4")
        assert [s.name for s in model.labels] == [f"it{i}_km{k}"]
    # init_from_previous (the demo's): iteration 2 started from iteration 1's final backbone.
    assert f"backbone from {run / 'it1/train/checkpoints/step_4/model.pt'}" in first.stderr
    # layer: auto (the demo's) clustered the layer iteration 1's held-out phone probe ranked best.
    from pretrain.probe.results import chosen_layer

    probe1 = json.loads((run / "it1/probe/probe.json").read_text())
    assert set(probe1["rows"]) == {"mfcc", "logmel", "untrained", "model"}
    assert set(json.loads((run / "it2/probe/probe.json").read_text())["rows"]) == {"model"}
    assert json.loads((run / "it2/features/meta.json").read_text())["spec"]["layer"] == \
        chosen_layer(run / "it1/probe/probe.json", "phone_acc")
    hf = transformers.HubertModel.from_pretrained(run / "hf")
    assert hf.config.num_hidden_layers == 2
    # The export's model card, from the run's own files: steps, hours, labels, held-out probes.
    card = (run / "hf/README.md").read_text()
    assert (run / "hf/model.safetensors").is_file() and "- 4 optimizer steps" in card
    assert " h of audio (11 utterances)" in card and "`it2_km30` (30 classes, 50 Hz)" in card
    assert "## Probes (held-out speech)" in card and "| phone_acc |" in card
    report = (run / "report.md").read_text()
    for png in ("verdict", "stages", "quality", "loss", "accuracy", "probes"):
        assert f"report/{png}.png" in report and (run / "report" / f"{png}.png").stat().st_size > 1000
    assert "PNMI" in report and "on PNMI:" in report
    assert "## Probes on held-out speech" in report
    # The report opens with the verdict: held-out label PNMI at equal k (iteration 2's k=30
    # differs from iteration 1's, so an MFCC k-means at k=30 was fitted for it), then the
    # models' probes against each other and the baselines.
    assert report.index("## Verdict") < report.index("## Time per stage")
    held = {name: json.loads((run / f"{name}/quality.json").read_text())
            for name in ("it1/heldout", "it2/heldout", "it2/mfcc_heldout")}
    assert {h["label_rate"] for h in held.values()} == {50}
    assert held["it2/mfcc_heldout"]["clusters"] == held["it2/heldout"]["clusters"] == 30
    assert (f"MFCC labels at the same k on held-out PNMI: {held['it2/heldout']['pnmi']:.3f} vs "
            f"{held['it2/mfcc_heldout']['pnmi']:.3f}") in report
    assert "(b) the iteration-2 model" in report and "(c) the iteration-1 model" in report
    for row in ("| MFCC-39 |", "| log-mel 80 |", "| untrained |", "| it1 |", "| it2 |", "| it2 weighted sum |"):
        assert row in report, report
    records = {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json") if p.stem != "identity"}
    assert len(records) == 18 and len(records["it2.train"]["attempts"]) == 2
    table = format_status(run_status(run))  # `pretrain status RUN`
    assert "it2.train          done            2" in table and "it2: step 4/4, loss " in table, table

    # A rerun does no work.
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "stages").glob("*.json")}
    third = iterate(run, tiny_corpus, small_shards)
    assert third.returncode == 0 and "0 stages run" in third.stdout
    assert {p: p.stat().st_mtime_ns for p in (run / "stages").glob("*.json")} == mtimes

    # Changing iteration 2's k invalidates its clustering and everything after it, and says so
    # (checked on the plan; rerunning those stages is what the interruption above exercised).
    import logging

    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.pipeline.ledger import invalidate_changed, status
    from pretrain.pipeline.plan import plan

    changed = load_config(IterateConfig, [REPO / "configs/demo.yaml"], [*OVERRIDES(run, tiny_corpus, small_shards),
                                                                           "iterations.1.k=25"])
    stages = plan(changed)
    with caplog.at_level(logging.WARNING, logger="pretrain.pipeline.ledger"):
        stale = invalidate_changed(changed.run_dir, stages)
    assert stale == ["it2.kmeans", "it2.labels", "it2.quality", "it2.heldout", "it2.mfcc_kmeans", "it2.mfcc_heldout",
                     "it2.train", "it2.probe", "export"]
    assert "stage it2.kmeans: its config changed (k: 30 -> 25)" in caplog.text
    assert not (run / "it2/kmeans").exists() and not (shards / "labels/it2_km30").exists()
    assert not (run / "it2/train").exists() and (run / "it2/features/meta.json").is_file()
    assert [n for n, s in status(changed.run_dir, stages).items() if s == "pending"] == stale

    # Under SLURM the same bookkeeping decides what to submit: a dry run lists only the stages
    # that are not done, each as `pretrain iterate --only STAGE`, and deletes nothing.
    fifth = subprocess.run([str(Path(sys.executable).parent / "launch"), "slurm", "--profile",
                            str(REPO / "configs/cluster/local.yaml"), "--dry-run", "iterate", "--config",
                            str(REPO / "configs/demo.yaml"), *OVERRIDES(run, tiny_corpus, small_shards),
                            "iterations.1.k=25"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert fifth.returncode == 0, fifth.stderr
    listed = [line.split()[2].rstrip(":") for line in fifth.stdout.splitlines() if line.startswith("# iterate ")]
    assert listed == ["it2.kmeans", "it2.labels", "it2.quality", "it2.heldout", "it2.mfcc_kmeans",
                      "it2.mfcc_heldout", "it2.train", "it2.probe", "export"]
    assert "--only it2.train" in fifth.stdout and "#SBATCH --ntasks-per-node=2" in fifth.stdout
    assert "#SBATCH --array=0-1" in fifth.stdout  # label assignment as an array job
    assert not (run / "slurm").exists()  # a dry run writes nothing


def test_an_fbank_run_with_export_is_refused_before_anything_runs(tmp_path):
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.pipeline.plan import plan
    from pretrain.utils import PretrainError

    overrides = [f"run_dir={tmp_path / 'run'}", f"train_configs=[{REPO / 'configs/small_cpu.yaml'}]"]
    cfg = load_config(IterateConfig, [REPO / "configs/demo.yaml"], [*overrides, "export=true"])
    with pytest.raises(PretrainError, match="export: .*model.frontend='fbank'.*set export=false"):
        plan(cfg)
    assert [s.name for s in plan(load_config(IterateConfig, [REPO / "configs/demo.yaml"],
                                             [*overrides, "export=false"]))][-1] == "it2.probe"
    assert not (tmp_path / "run").exists()


def test_no_progress_reaches_every_stage_iterate_runs(tmp_path, monkeypatch):
    import subprocess as sp

    from pretrain.pipeline import plan as planning, run as running
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig

    cfg = load_config(IterateConfig, [REPO / "configs/demo.yaml"], [f"run_dir={tmp_path / 'run'}"])
    stages = {s.name: s for s in planning.plan(cfg)}
    commands = []
    monkeypatch.setattr(sp, "run", lambda cmd, **kw: commands.append(cmd) or sp.CompletedProcess(cmd, 1))
    for name in ("it1.features", "it1.train", "it1.probe"):
        for progress in (False, True):
            with pytest.raises(PretrainError, match=f"stage {name} failed"):
                running.run_stage(cfg, stages[name], progress=progress)
    assert [c[-1] == "--no-progress" for c in commands] == [True, False] * 3
    assert commands[2][1:3] == ["local", "--nproc"]  # training, through launch local


def test_the_stuck_job_limits_do_not_change_a_training_stage_fingerprint(tmp_path):
    """Runs made before the limits existed, or with other limits, are not redone (and their
    outputs not deleted) for them."""
    from pretrain.pipeline import ledger, plan as planning
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig

    def fingerprints(*overrides: str) -> dict[str, str]:
        cfg = load_config(IterateConfig, [REPO / "configs/demo.yaml"], [f"run_dir={tmp_path / 'run'}", *overrides])
        stages = planning.plan(cfg, create_identity=False)
        ledger.invalidate_changed(cfg.run_dir, stages, delete=False)
        return {s.name: s.fingerprint for s in stages}

    plain = fingerprints()
    limits = fingerprints("train_overrides=[optim.warmup_steps=50,checkpoint.every=250,log.every=25,"
                          "stall_timeout=60,startup_timeout=0,collective_timeout=99]")
    assert plain == limits
    assert fingerprints("train_overrides=[optim.warmup_steps=51]")["it1.train"] != plain["it1.train"]


def test_a_layer_beyond_the_previous_model_is_refused_before_anything_runs(tmp_path):
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.pipeline.plan import plan

    base = [f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(PretrainError, match=r"iterations.1.layer: 6, but iteration 1's model has 3 Transformer "
                                            r"layers \(1..3\)"):
        plan(load_config(IterateConfig, [REPO / "configs/demo.yaml"], [*base, "iterations.1.layer=6"]),
             create_identity=False)
    plan(load_config(IterateConfig, [REPO / "configs/demo.yaml"], [*base, "iterations.1.layer=3"]),
         create_identity=False)
    assert not (tmp_path / "run").exists()


def test_an_evaluation_corpus_too_small_for_the_probe_split_is_refused_at_once(tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.config.iterate import IterateConfig

    overrides = [f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"eval.synth_hours.*0.02 h gives about 0.9 utterances per voice \(11 "
                                          r"voices.*needs 3 per voice: set at least 0.06"):
        load_config(IterateConfig, [REPO / "configs/demo.yaml"], [*overrides, "eval.synth_hours=0.02"])
    # The demo's own, and an eval set of fewer voices, pass.
    load_config(IterateConfig, [REPO / "configs/demo.yaml"], overrides)
    load_config(IterateConfig, [REPO / "configs/demo.yaml"],
                [*overrides, "eval.synth_hours=0.02", "eval.synth_voices=[flite-slt,flite-awb]"])
    assert not (tmp_path / "run").exists()


def test_the_protocol_corpus_axes_reach_both_corpora_and_old_runs_keep_their_fingerprints(tmp_path):
    """Voices, sentence length and speaking rate of the synthesized corpora; the held-out one has
    every voice unless told otherwise; a rate left at 1.0 fingerprints as runs made before
    the field existed did (so upgrading never invalidates, and deletes, a finished corpus)."""
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.pipeline import ledger
    from pretrain.pipeline.plan import plan

    base = [f"run_dir={tmp_path / 'run'}", "export=false"]

    def stages(*overrides: str) -> dict:
        return {s.name: s for s in plan(load_config(IterateConfig, [REPO / "configs/demo.yaml"], [*base, *overrides]))}

    plain = stages()
    assert "stretch" not in " ".join(plain["corpus"].argv)
    # A record written before `stretch` existed (no such field, a fingerprint of its own) still
    # describes the corpus at the default rate; one made at another rate does not.
    run, corpus = tmp_path / "run", plain["corpus"]
    ledger.start_record(run, corpus)
    old = json.loads(ledger.record_path(run, "corpus").read_text())
    del old["config"]["stretch"]
    ledger.record_path(run, "corpus").write_text(json.dumps({**old, "fingerprint": "0" * 64}))
    assert ledger.unchanged(run, [corpus])["corpus"] is not None
    old["config"]["stretch"] = 1.2
    ledger.record_path(run, "corpus").write_text(json.dumps({**old, "fingerprint": "0" * 64}))
    assert ledger.unchanged(run, [corpus])["corpus"] is None
    varied = stages("corpus.synth_voices=[flite-awb,espeak-m3]", "corpus.synth_stretch=1.2",
                    "corpus.synth_max_clauses=1")
    corpus, held = varied["corpus"].config, varied["eval.corpus"].config
    assert corpus["voices"] == ["flite-awb", "espeak-m3"] and corpus["stretch"] == 1.2 and corpus["max_clauses"] == 1
    assert len(held["voices"]) == 11 and held["stretch"] == 1.2 and held["max_clauses"] == 1
    assert varied["corpus"].fingerprint != plain["corpus"].fingerprint
    assert stages("eval.synth_voices=[flite-rms]")["eval.corpus"].config["voices"] == ["flite-rms"]
    # Held-out label quality: each iteration's k-means on the evaluation shards; an MFCC
    # k-means at a model iteration's k only where it differs from iteration 1's.
    same_k = stages("iterations.1.k=100")
    assert "it2.heldout" in same_k and "it2.mfcc_heldout" not in same_k
    heldout = same_k["it2.heldout"].argv
    assert heldout[heldout.index("--shards") + 1] == str(tmp_path / "run/eval/shards")
    other_k = stages("iterations.1.k=300")
    assert other_k["it2.mfcc_kmeans"].upstream == ["it1.features"] and "it2.mfcc_heldout" in other_k
    # init_from_previous: iteration 2 trains from iteration 1's final backbone.
    init = stages("iterations.0.max_steps=70", "iterations.1.init_from_previous=true")["it2.train"]
    assert f"init_from='{tmp_path / 'run/it1/train/checkpoints/step_70'}'" in init.argv
    assert "it1.train" in init.upstream
    with pytest.raises(Exception, match="iteration 1 has no previous model to start from"):
        stages("iterations.0.init_from_previous=true")


def _finish_everything(cfg) -> list:
    """Make every stage of ``cfg`` look finished (records and completion marks), without
    running any: what the bookkeeping sees after a finished run."""
    import hashlib

    import numpy as np

    from pretrain.pipeline import ledger, plan as planning

    stages = planning.plan(cfg)
    run = Path(cfg.run_dir)
    for stage in stages:
        ledger.start_record(run, stage)
        mark = stage.done_mark
        mark.parent.mkdir(parents=True, exist_ok=True)
        if stage.argv[:2] == ["kmeans", "fit"]:
            np.save(mark.parent / "centroids.npy", np.zeros((2, 3), np.float32))
            sha = hashlib.sha256((mark.parent / "centroids.npy").read_bytes()).hexdigest()
            mark.write_text(json.dumps({"centroids_sha256": sha}))
        elif stage.argv[:2] == ["kmeans", "assign"]:
            sha = json.loads((Path(stage.argv[stage.argv.index("--kmeans") + 1]) / "kmeans.json").read_text())
            mark.write_text(json.dumps({"provenance": sha}))
        else:
            mark.write_text(stage.done_check if isinstance(stage.done_check, str) else "{}")
        ledger.finish_record(run, stage, 1.0)
    assert set(ledger.status(cfg.run_dir, stages).values()) == {"done"}
    return stages


@pytest.mark.long
def test_a_moved_run_resumes_and_a_copy_is_a_run_of_its_own(tmp_path, caplog):
    """Relative paths in fingerprints and records: a copied run directory is complete and
    deletes nothing of the original; a moved one resumes with nothing to do; a run made with
    absolute paths in its records is carried over, not invalidated; runs sharing an outside shard
    directory name their label sets apart."""
    import shutil

    from pretrain.pipeline import ledger, plan as planning
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig

    def load(run: Path, *overrides: str) -> IterateConfig:
        return load_config(IterateConfig, [REPO / "configs/demo.yaml"], [f"run_dir={run}", *overrides])

    a = tmp_path / "runs" / "a"
    _finish_everything(load(a))
    files = sorted(p.relative_to(a) for p in a.rglob("*"))
    b = tmp_path / "runs" / "b"
    shutil.copytree(a, b)
    cfg_b = load(b)
    stages = planning.plan(cfg_b)
    assert ledger.invalidate_changed(cfg_b.run_dir, stages) == []
    assert set(ledger.status(cfg_b.run_dir, stages).values()) == {"done"}
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == files
    record = json.loads((b / "stages/it1.kmeans.json").read_text())
    assert record["config"]["out"] == "${run_dir}/it1/kmeans" and record["outputs"] == ["${run_dir}/it1/kmeans"]

    # A config change in the copy deletes the copy's outputs only.
    changed = load(b, "iterations.0.k=50")
    assert "it1.kmeans" in ledger.invalidate_changed(changed.run_dir, planning.plan(changed))
    assert not (b / "it1/kmeans").exists() and (a / "it1/kmeans/kmeans.json").is_file()
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == files

    c = tmp_path / "elsewhere" / "c"
    shutil.move(a, c)
    cfg_c = load(c)
    assert ledger.invalidate_changed(cfg_c.run_dir, planning.plan(cfg_c)) == []
    assert set(ledger.status(cfg_c.run_dir, planning.plan(cfg_c)).values()) == {"done"}

    # A record written by the absolute-path bookkeeping (paths of where the run was then, a
    # fingerprint of that form) is carried over, and rewritten in today's form.
    stages = planning.plan(cfg_c)
    record = json.loads((c / "stages/it1.train.json").read_text())
    stage = next(s for s in stages if s.name == "it1.train")
    old = json.loads(json.dumps(record).replace("${run_dir}", str(a.resolve())))
    (c / "stages/it1.train.json").write_text(json.dumps({**old, "fingerprint": "0" * 64}))
    assert ledger.invalidate_changed(cfg_c.run_dir, stages) == []
    rewritten = json.loads((c / "stages/it1.train.json").read_text())
    assert rewritten["fingerprint"] == stage.fingerprint and rewritten["outputs"] == ["${run_dir}/it1/train"]

    # Outside shards: each run's label sets carry its id, a copy gets its own, and
    # invalidation deletes only what the run owns.
    shared = tmp_path / "shared_shards"
    (shared / "labels").mkdir(parents=True)
    (shared / "manifest.json").write_text("{}")
    x, y = tmp_path / "x", tmp_path / "y"
    outside = ["corpus.synth_hours=null", f"corpus.shards={shared}", "eval.synth_hours=null",
               f"eval.shards={tmp_path / 'eval_shards'}"]
    names = {}
    for run in (x, y):
        stages = _finish_everything(load(run, *outside))
        names[run] = next(s for s in stages if s.name == "it1.labels").argv
    ids = {run: json.loads((run / "stages/identity.json").read_text())["run_id"] for run in (x, y)}
    assert f"it1_km100-{ids[x]}" in names[x] and f"it1_km100-{ids[y]}" in names[y] and ids[x] != ids[y]
    z = tmp_path / "z"
    shutil.copytree(x, z)
    with caplog.at_level("WARNING", logger="pretrain.pipeline.ledger"):
        cfg_z = load(z, *outside)
        stale = ledger.invalidate_changed(cfg_z.run_dir, planning.plan(cfg_z))
    assert "is a copy of" in caplog.text and "it1.labels" in stale and "it1.kmeans" not in stale
    assert (shared / f"labels/it1_km100-{ids[x]}/meta.json").is_file()  # x's, untouched
    assert "not deleting" in caplog.text


def test_an_interrupted_corpus_synthesis_is_redone_when_the_run_is_resumed(tmp_path):
    """`make demo` interrupted during synthesis, then rerun: the corpus folder holds a partial
    synthesis, which the stage (not done) redoes instead of refusing a non-empty folder."""
    from pretrain.pipeline import plan as planning, run as running
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig

    cfg = load_config(IterateConfig, [REPO / "configs/demo.yaml"],
                      [f"run_dir={tmp_path / 'run'}", "corpus.synth_hours=0.0004", "corpus.synth_voices=[flite-kal16]"])
    corpus = next(s for s in planning.plan(cfg) if s.name == "corpus")
    (tmp_path / "run/corpus/audio").mkdir(parents=True)
    (tmp_path / "run/corpus/audio/000000.flac").write_bytes(b"half a file")
    (tmp_path / "run/corpus/utterances.jsonl").write_text('{"key": "000000"')
    running.run_stage(cfg, corpus)
    assert corpus.done()
    lines = (tmp_path / "run/corpus/utterances.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["voice"] == "flite-kal16" for line in lines)


@pytest.mark.parametrize("objective, learns", [("data2vec", "from an EMA teacher"),
                                               ("wav2vec2", "its own quantized targets")])
def test_a_label_free_run_is_refused_naming_the_iteration(tmp_path, objective, learns):
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.pipeline.plan import plan
    from pretrain.utils import PretrainError

    overrides = [f"run_dir={tmp_path / 'run'}", "export=false",
                 f"train_configs=[{REPO / 'configs/model/tiny.yaml'},{REPO / 'configs/train/tiny_cpu.yaml'}]"]
    cfg = load_config(IterateConfig, [REPO / "configs/demo.yaml"],
                      [*overrides, f"iterations.1.train_overrides=[model.objective={objective}]"])
    with pytest.raises(PretrainError, match=rf"iterations\.1: its training has model.objective={objective} "
                                            rf".*learns {learns}.*iterations\.1\.k=100"):
        plan(cfg)
    assert not (tmp_path / "run").exists()


def test_the_objective_comparison_configs_compare_like_with_like(tmp_path):
    """configs/compare/: HuBERT iteration 1 alone is the two-iteration run's first iteration,
    the two-iteration run is the demo, and data2vec trains the same model, data and optimizer
    for HuBERT's updates in all (experiments/objective_compare.py relies on each)."""
    import dataclasses

    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.config.train import TrainConfig

    def load(name: str) -> IterateConfig:
        return load_config(IterateConfig, [REPO / name], [f"run_dir={tmp_path / 'run'}", "reference_curves=null"])

    it1, it2, demo = load("configs/compare/hubert_it1.yaml"), load("configs/compare/hubert_it2.yaml"), \
        load("configs/demo.yaml")
    assert it1.iterations == it2.iterations[:1] and len(it2.iterations) == 2
    assert dataclasses.replace(it1, iterations=it2.iterations) == it2 == demo
    small = load_config(TrainConfig, [REPO / "configs/small_cpu.yaml"],
                        [*it2.train_overrides, "run_dir=x", "data.shards=x", "data.labels=[km]"])
    d2v = load_config(TrainConfig, [REPO / "configs/small_cpu.yaml", REPO / "configs/compare/data2vec.yaml"],
                      ["run_dir=x", "data.shards=x"])
    assert d2v.model.objective == "data2vec" and d2v.data.labels == []
    assert d2v.optim.max_steps == sum(it.max_steps for it in it2.iterations)
    assert d2v.optim.warmup_steps == small.optim.warmup_steps and d2v.optim.lr == small.optim.lr
    assert dataclasses.replace(d2v.model, objective="hubert", data2vec=small.model.data2vec) == small.model
    assert dataclasses.replace(d2v.data, labels=small.data.labels) == small.data


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    """``iterate --dry-run``: on an empty folder every stage would run and nothing is created;
    on a finished run everything is done; after a config change the changed stage names the
    field and its downstream stages name it as the reason, while the run's files stay as
    they are."""
    from pretrain.cli import main
    from pretrain.config import load_config
    from pretrain.config.iterate import IterateConfig

    run = tmp_path / "run"
    argv = ["iterate", "--config", str(REPO / "configs/demo.yaml"), f"run_dir={run}", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "it2.train" in out and "never run" in out and re.search(r"\n(\d+) of \1 stages would run", out)
    assert not run.exists()

    _finish_everything(load_config(IterateConfig, [REPO / "configs/demo.yaml"], [f"run_dir={run}"]))
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert re.search(r"\n0 of (\d+) stages would run; \1 are done", capsys.readouterr().out)

    assert main([*argv[:-1], "iterations.1.k=120", "--dry-run"]) == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ")}
    assert lines["it1.train"] == "done"
    assert lines["it2.kmeans"].startswith("rerun: its config changed (") and "k: 100 -> 120" in lines["it2.kmeans"]
    assert lines["it2.labels"] == "rerun: its config changed (name: it2_km100 -> it2_km120)"
    assert lines["it2.heldout"] == "rerun: upstream it2.kmeans changed"
    assert lines["it2.probe"] == "rerun: upstream it2.train changed"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_every_shards_build_option_reaches_the_shard_stages_from_an_iterate_config(tmp_path):
    """A user's corpus: ``corpus.shards_overrides`` and ``eval.input`` / ``eval.shards_overrides``
    reach ``pretrain shards build`` (speakers, long-file splitting, a held-out split, the audio
    format), and a mistyped option is refused, naming the stage and the field, before anything
    runs."""
    from pretrain.config import ConfigError, load_config
    from pretrain.config.iterate import IterateConfig
    from pretrain.pipeline.plan import plan

    def stages(*overrides: str) -> dict:
        cfg = load_config(IterateConfig, [REPO / "configs/demo.yaml"], [
            f"run_dir={tmp_path / 'run'}", "corpus.synth_hours=null", "corpus.input=/data/LibriSpeech/train-clean-100",
            "eval.synth_hours=null", *overrides])
        return {s.name: s for s in plan(cfg, create_identity=False)}

    planned = stages("corpus.shards_overrides=['speaker_from=dir_level 0',max_duration=20,long_policy=split,"
                     "subset=train,valid_fraction=0.1,audio_format=wav]",
                     "eval.input=/data/LibriSpeech/dev-clean", "eval.shards_overrides=['speaker_from=dir_level 0']")
    argv = planned["shards"].argv
    assert argv[:3] == ["shards", "build", "--input"] and argv[-6:] == [
        "speaker_from=dir_level 0", "max_duration=20", "long_policy=split", "subset=train", "valid_fraction=0.1",
        "audio_format=wav"]
    assert planned["shards"].config["max_duration"] == 20 and planned["shards"].config["audio_format"] == "wav"
    assert "eval.corpus" not in planned and planned["eval.shards"].argv[3] == "/data/LibriSpeech/dev-clean"
    assert planned["eval.shards"].config["speaker_from"] == "dir_level 0"
    assert "it1.probe" in planned and "it1.heldout" not in planned  # no phone alignments there yet
    with pytest.raises(PretrainError, match=r"stage shards: config error: .*field 'max_duraton': unknown field; "
                                            r"did you mean 'max_duration'"):
        stages("corpus.shards_overrides=[max_duraton=20]", "eval.input=/data/LibriSpeech/dev-clean")
    with pytest.raises(ConfigError, match=r"field 'eval.shards': set at most one of synth_hours, input and "
                                          r"shards \(got input, shards\)"):
        stages("eval.input=/x", "eval.shards=/y")
    assert not (tmp_path / "run").exists()
