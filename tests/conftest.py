"""Shared fixtures: the tiny synthetic corpus (one utterance per voice) and marker handling."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


CORPORA = {
    "tiny": ([REPO / "configs/corpus/tiny.yaml"], []),  # 11 utterances, one per voice
    "small": ([], ["count=40", "max_clauses=2", "seed=3"]),  # 40 of 1-2 clauses, about 2.5 minutes
    # The demo corpus's first 320 utterances (every voice, 1-3 clauses): FLAC's property test.
    "demo320": ([], ["count=320", "seed=0"]),
}


def synthesize_test_corpus(name: str, out: Path) -> Path:
    from pretrain.config import load_config
    from pretrain.config.corpus import CorpusSynthConfig
    from pretrain.corpus.synth import synthesize_corpus

    files, overrides = CORPORA[name]
    cfg = load_config(CorpusSynthConfig, files, [*overrides, f"out={out}", "jobs=2"])
    synthesize_corpus(cfg, progress=False, argv=["test"])
    return out


def _corpus(name: str, tmp_path_factory) -> Path:
    # A GPU machine without TTS engines gets the same corpora synthesized elsewhere
    # (benchmarks/gpu_prepare.sh); a copy, since tests may write beside them.
    carried = os.environ.get("PRETRAIN_TEST_CORPORA")
    if carried and (Path(carried) / name / "corpus.json").is_file():
        out = tmp_path_factory.mktemp(f"{name}_corpus") / "corpus"
        shutil.copytree(Path(carried) / name, out)
        return out
    return synthesize_test_corpus(name, tmp_path_factory.mktemp(f"{name}_corpus"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """configs/corpus/tiny.yaml synthesized once per test session: 11 utterances, 11 voices."""
    return _corpus("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """40 utterances of 1-2 clauses from all voices (about 2.5 minutes)."""
    return _corpus("small", tmp_path_factory)


@pytest.fixture(scope="session")
def small_shards(small_corpus, tmp_path_factory) -> Path:
    """small_corpus in 10 shards of 4 utterances, with the gold phones50/phones100 label sets."""
    from pretrain.config import load_config
    from pretrain.config.shards import ShardsBuildConfig
    from pretrain.data.shards import build_shards

    out = tmp_path_factory.mktemp("small_shards")
    cfg = load_config(ShardsBuildConfig, [], [f"input={small_corpus}", f"out={out}", "per_shard=4", "jobs=2"])
    build_shards(cfg, progress=False, argv=["test"])
    return out


@pytest.fixture(scope="session")
def noise_shards(small_corpus, tmp_path_factory) -> Path:
    """About 1.5 minutes of synthetic noise of every kind (babble cut from small_corpus), in
    shards of 4 clips."""
    from pretrain.config import load_config
    from pretrain.config.corpus import NoiseSynthConfig
    from pretrain.config.shards import ShardsBuildConfig
    from pretrain.corpus.noise import synthesize_noise
    from pretrain.data.shards import build_shards

    noise = tmp_path_factory.mktemp("noise")
    synthesize_noise(load_config(NoiseSynthConfig, [], [f"out={noise}", "hours=0.025", f"speech={small_corpus}"]),
                     progress=False, argv=["test"])
    out = tmp_path_factory.mktemp("noise_shards")
    build_shards(load_config(ShardsBuildConfig, [], [f"input={noise}", f"out={out}", "per_shard=4", "jobs=2"]),
                 progress=False, argv=["test"])
    return out


@pytest.fixture(scope="session")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    """The reference training run of the resume tests (local 2-process DeepSpeed, 16 steps,
    grad_accum 2); the SLURM preemption test compares its losses with it too."""
    from tests.train.test_train import launch

    run = tmp_path_factory.mktemp("train") / "straight"
    launch(run, small_shards, "deepspeed.grad_accum=2")
    return run
