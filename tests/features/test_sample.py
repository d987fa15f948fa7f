"""The k-means sample: seeded, bounded, split-independent, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.config.cluster import FeaturesMfccConfig, FeaturesModelConfig
from pretrain.data.shards import iter_shard, read_manifest
from pretrain.features.extract import Extractor, FeatureSpec, shard_utterances
from pretrain.features.sample import dump_features, in_sample, load_sample
from pretrain.frames import conv_num_frames, mfcc_num_frames
from pretrain.utils import PretrainError

pytestmark = pytest.mark.slow


def cfg(shards: Path, out: Path, *overrides: str, schema=FeaturesMfccConfig):
    return load_config(schema, [], [f"shards={shards}", f"out={out}", *overrides])


def test_sample_is_bounded_seeded_and_independent_of_the_task_split(small_shards, tmp_path):
    one = dump_features(cfg(small_shards, tmp_path / "one", "fraction=0.5", "max_frames=4000"),
                        FeatureSpec.mfcc(), progress=False)
    # The same plan done by two tasks, one after the other: only the second finishes it.
    assert dump_features(cfg(small_shards, tmp_path / "two", "fraction=0.5", "max_frames=4000", "task=1",
                             "num_tasks=2"), FeatureSpec.mfcc(), progress=False) is None
    two = dump_features(cfg(small_shards, tmp_path / "two", "fraction=0.5", "max_frames=4000", "task=0",
                            "num_tasks=2", "jobs=2"), FeatureSpec.mfcc(), progress=False)
    assert one["sample_sha256"] == two["sample_sha256"]
    assert 0 < one["total_frames"] <= 4000
    x, meta = load_sample(tmp_path / "one")
    assert x.shape == (one["total_frames"], 39) and x.dtype == np.float32
    keys = [s["__key__"] for e in read_manifest(small_shards)["shards"] for s in iter_shard(small_shards / e["name"])]
    sampled = [k for k in keys if in_sample(0, k, 0.5)]
    assert meta["total_utterances"] == len(sampled) and 0 < len(sampled) < len(keys)
    # Each shard's record lists its sampled keys with their full frame counts.
    name = read_manifest(small_shards)["shards"][0]["name"]
    record = json.loads((tmp_path / "one" / f"{name}.json").read_text())
    for key, wave in shard_utterances(small_shards / name):
        if key in record["keys"]:
            assert record["frames"][record["keys"].index(key)] == mfcc_num_frames(len(wave))


def test_rerun_skips_done_shards_and_another_plan_is_refused(small_shards, tmp_path, caplog):
    c = cfg(small_shards, tmp_path / "f", "fraction=0.3")
    dump_features(c, FeatureSpec.mfcc(), progress=False)
    npy = sorted((tmp_path / "f").glob("*.npy"))
    before = {p: p.stat().st_mtime_ns for p in npy}
    npy[0].write_bytes(b"damaged")  # one shard redone, the others kept
    with caplog.at_level("INFO"):
        dump_features(c, FeatureSpec.mfcc(), progress=False)
    assert "1 to do" in caplog.text
    assert all(p.stat().st_mtime_ns == before[p] for p in npy[1:])
    assert load_sample(tmp_path / "f")[0].shape[1] == 39
    with pytest.raises(PretrainError, match="another plan .*fraction"):
        dump_features(cfg(small_shards, tmp_path / "f", "fraction=0.4"), FeatureSpec.mfcc(), progress=False)


def test_missing_meta_and_bad_files_are_named(small_shards, tmp_path):
    with pytest.raises(PretrainError, match="no meta.json"):
        load_sample(tmp_path)
    dump_features(cfg(small_shards, tmp_path / "f", "fraction=0.3"), FeatureSpec.mfcc(), progress=False)
    victim = sorted((tmp_path / "f").glob("*.npy"))[0]
    np.save(victim, np.full((3, 39), np.nan, np.float32))
    with pytest.raises(PretrainError, match=victim.name):
        load_sample(tmp_path / "f")


def make_model_file(path: Path, *overrides: str) -> Path:
    from pretrain.config.train import TrainConfig
    from pretrain.model.checkpoint import save_model
    from pretrain.model.hubert import HubertPretrain, LabelSpec
    from tests.model.test_model import REPO

    c = load_config(TrainConfig, [REPO / "configs/model/tiny.yaml"],
                    ["run_dir=x", "data.shards=x", "data.labels=[km]", *overrides])
    torch.manual_seed(0)
    save_model(path, HubertPretrain(c.model, [LabelSpec("km", 10, 50)]))
    return path


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.mark.parametrize("mode", ["group_norm", "layer_norm"])
def test_padding_in_a_batch_does_not_change_model_features(small_shards, tmp_path, mode):
    # group_norm (BASE) normalizes over the padded time axis, so the extractor runs it one
    # utterance at a time; layer_norm (LARGE) batches.
    spec = FeatureSpec.model(str(make_model_file(tmp_path / "m.pt", f"model.extractor_mode={mode}")), 1)
    name = read_manifest(small_shards)["shards"][0]["name"]
    waves = [w for _, w in shard_utterances(small_shards / name)]
    assert len({len(w) for w in waves}) > 1
    batched = Extractor(spec, "cpu", batch_samples=10**7)(waves)
    alone = [Extractor(spec, "cpu")([w])[0] for w in waves]
    for w, a, b in zip(waves, batched, alone):
        assert a.shape == (conv_num_frames(len(w)), 64)
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_model_features_record_their_checkpoint(small_shards, tiny_model_file, tmp_path):
    spec = FeatureSpec.model(str(tiny_model_file), 2)
    assert (spec.rate, spec.dim, spec.layer) == (50, 64, 2)
    with pytest.raises(PretrainError, match="layer 9 does not exist"):
        FeatureSpec.model(str(tiny_model_file), 9)
    meta = dump_features(cfg(small_shards, tmp_path / "m", f"checkpoint={tiny_model_file}", "layer=2",
                             "fraction=0.2", "dtype=float16", schema=FeaturesModelConfig), spec, progress=False)
    assert meta["spec"]["checkpoint_sha256"] == spec.checkpoint_sha256
    assert np.load(next((tmp_path / "m").glob("*.npy"))).dtype == np.float16
    copy = tmp_path / "changed.pt"
    shutil.copy(tiny_model_file, copy)
    changed = FeatureSpec.model(str(copy), 2)
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(PretrainError, match="changed since"):
        Extractor(changed, "cpu")
