"""Every shipped recipe config runs: resolved as shipped and run for one step on CPU at a tiny
size (the sizes come as key=value overrides after the file; nothing of the file is copied).
The long one, the LibriSpeech iterate recipe, runs both of its iterations end to end on a
LibriSpeech-shaped tree of synthetic speech."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
ENV.pop("PRETRAIN_FAULT", None)

TINY = ["model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=128",
        "model.encoder_attention_heads=4", "model.final_dim=32", "data.max_tokens=40000",
        "data.max_sample_size=32000", "data.min_sample_size=8000", "data.num_workers=1", "data.bucket_size=16",
        "data.shuffle_window=8", "optim.max_steps=1", "optim.warmup_steps=0", "deepspeed.precision=fp32",
        "checkpoint.every=1", "log.every=1"]

RECIPES = {  # config files (in order) -> what the test adds besides TINY
    "librilight_hubert_large": (["configs/model/large.yaml", "configs/librilight_hubert_large.yaml"],
                                ["data.labels=[phones50]"]),
    "wavlm_base_plus_pretrain": (["configs/wavlm_base_plus_pretrain.yaml"], ["data.labels=[phones50]"]),
    "data2vec_base_librispeech": (["configs/data2vec_base_librispeech.yaml"], ["model.data2vec.top_k_layers=2"]),
}
ITERATE = ["configs/librispeech_hubert_base.yaml", "configs/librispeech_hubert_base_1node.yaml"]


def run(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "pretrain"), *argv], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_every_shipped_recipe_has_a_test():
    shipped = {p.stem for p in (REPO / "configs").glob("*.yaml")} - {"demo", "small_cpu"}
    assert shipped == set(RECIPES) | {Path(p).stem for p in ITERATE}


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_as_shipped_resolves_and_says_what_is_missing(name, tmp_path):
    """As shipped, each recipe asks for what only the user knows (paths, label sets) by name."""
    files, _ = RECIPES[name]
    proc = subprocess.run([str(BIN / "pretrain"), "train", *[a for f in files for a in ("--config", f)],
                           "--print-config"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "field 'run_dir': is required" in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name", RECIPES)
def test_a_train_recipe_runs_one_step_at_tiny_size(name, small_shards, noise_shards, tmp_path):
    files, extra = RECIPES[name]
    mixing = [f"data.mixing.noise_shards={noise_shards}"] if "wavlm" in name else []
    run("train", *[a for f in files for a in ("--config", f)], f"run_dir={tmp_path / 'run'}",
        f"data.shards={small_shards}", *extra, *mixing, *TINY)
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "step_1"


def test_the_librispeech_recipe_plans_at_full_size(tmp_path):
    """As shipped (BASE, 8 processes, the paper's iterations): every stage's config resolves."""
    for files in (ITERATE[:1], ITERATE):
        proc = run("iterate", *[a for f in files for a in ("--config", f)], f"run_dir={tmp_path / 'run'}",
                   "corpus.input=/data/LibriSpeech/train-960", "eval.input=/data/LibriSpeech/dev-clean", "--dry-run")
        assert "it2.train" in proc.stdout and "never run" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.multiprocess
def test_the_librispeech_recipe_runs_both_iterations_on_one_node(librispeech_tree, tmp_path):
    """Both files layered (one node, 4 accumulated micro-steps), on a LibriSpeech-shaped tree:
    speakers from the folders, the dev set sharded as the held-out set, each iteration's
    training one update at tiny size, the transformers export at the end."""
    per_iteration = [f"iterations.{i}.train_overrides=[{','.join(TINY)}]" for i in (0, 1)]
    run("iterate", *[a for f in ITERATE for a in ("--config", f)], f"run_dir={tmp_path / 'run'}",
        f"corpus.input={librispeech_tree / 'train-960'}", f"eval.input={librispeech_tree / 'dev-clean'}",
        "corpus.per_shard=8", "nproc=1", "jobs=1", "iterations.0.k=5", "iterations.0.fraction=1.0",
        "iterations.0.max_frames=20000", "iterations.0.max_steps=1", "iterations.1.k=5", "iterations.1.layer=1",
        "iterations.1.fraction=1.0", "iterations.1.max_frames=20000", "iterations.1.max_steps=1",
        "eval.probes=speaker", "eval.probe_overrides=[speaker.epochs=5]", *per_iteration,
        "--no-progress", timeout=1500)
    run_dir = tmp_path / "run"
    import json

    import yaml

    train = yaml.safe_load((run_dir / "it1/train/config.yaml").read_text())
    assert train["deepspeed"]["grad_accum"] == 4 and train["model"]["encoder_embed_dim"] == 64
    shards = json.loads((run_dir / "shards/manifest.json").read_text())
    assert shards["totals"]["utterances"] == 40
    record = json.loads((run_dir / "it2/probe/probe.json").read_text())
    assert "speaker" in json.dumps(record["best"])
    assert (run_dir / "hf/config.json").is_file()
    # The dashboard: one wandb group for the run, a named and tagged run per training, the code's
    # commit in its config (read back from the offline run files).
    from pretrain.pipeline.plan import wandb_group

    from tests.train.wandb_records import config_of, run_record

    for i, features in ((1, "mfcc"), (2, "layer-1")):
        wb = run_record(run_dir / f"it{i}/train")
        assert (wb.run_group, wb.display_name, wb.job_type) == (wandb_group(run_dir), f"it{i}.train", "train")
        assert list(wb.tags) == ["hubert", f"it{i}", "k5", features]
        config = config_of(wb)
        assert json.loads(config["git_commit"]) and json.loads(config["log"])["wandb_name"] == f"it{i}.train"
