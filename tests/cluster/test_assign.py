"""Label assignment over every shard: keyed sidecars that the training pipeline reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain.cluster.assign import assign_labels
from pretrain.cluster.kmeans import fit, load_kmeans
from pretrain.config import load_config
from pretrain.config.cluster import FeaturesMfccConfig, KmeansAssignConfig, KmeansFitConfig
from pretrain.config.data import DataConfig
from pretrain.data.labels import LabelSet, label_dir
from pretrain.data.pipeline import ShardLoader
from pretrain.data.shards import read_manifest
from pretrain.utils import PretrainError, sha256_file
from pretrain.features.extract import FeatureSpec, shard_utterances
from pretrain.features.mfcc import mfcc_39
from pretrain.features.sample import dump_features

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted(small_shards, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("assign")
    shards = root / "shards"
    shutil.copytree(small_shards, shards)
    dump_features(load_config(FeaturesMfccConfig, [], [f"shards={shards}", f"out={root / 'f'}", "fraction=0.5"]),
                  FeatureSpec.mfcc(), progress=False)
    fit(load_config(KmeansFitConfig, [], [f"features={root / 'f'}", f"out={root / 'km'}", "k=25", "niter=10"]))
    return shards, root / "km"


def assign_cfg(shards, km, *overrides):
    return load_config(KmeansAssignConfig, [], [f"kmeans={km}", f"shards={shards}", "name=km25", *overrides])


def test_every_utterance_gets_its_nearest_centroid_and_the_pipeline_reads_them(fitted, caplog):
    shards, km = fitted
    meta = assign_labels(assign_cfg(shards, km, "jobs=2"), progress=False)
    assert meta["num_classes"] == 25 and meta["label_rate"] == 100
    assert meta["provenance"]["centroids_sha256"] == load_kmeans(km)[1]["centroids_sha256"]
    centroids = load_kmeans(km)[0]
    labels = LabelSet(shards, "km25")
    manifest = read_manifest(shards)
    for entry in manifest["shards"][:3]:
        got = labels.load_shard(entry["name"])
        for key, wave in shard_utterances(shards / entry["name"]):
            f = mfcc_39(wave).astype(np.float64)
            brute = ((f[:, None] - centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
            assert (got[key] == brute).mean() > 0.999, key  # float32 ties aside
    loader = ShardLoader(load_config(DataConfig, [], [f"shards={shards}", "labels=[km25]", "num_workers=0", "min_sample_size=0",
                                                      "max_tokens=400000"]))
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == manifest["totals"]["utterances"]
    assert all(int(b["labels"]["km25"].max()) < 25 for b in batches)

    # A rerun does nothing; a damaged sidecar is redone alone.
    files = sorted(label_dir(shards, "km25").glob("*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    files[0].write_bytes(b"broken")
    with caplog.at_level("INFO"):
        assign_labels(assign_cfg(shards, km), progress=False)
    assert "1 to do" in caplog.text
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files[1:])
    assert len(LabelSet(shards, "km25").load_shard(manifest["shards"][0]["name"])) > 0


def test_two_array_tasks_share_the_shards_and_the_last_writes_meta(fitted):
    shards, km = fitted
    assert assign_labels(assign_cfg(shards, km, "name=split", "task=0", "num_tasks=2"), progress=False) is None
    assert not (label_dir(shards, "split") / "meta.json").exists()
    meta = assign_labels(assign_cfg(shards, km, "name=split", "task=1", "num_tasks=2"), progress=False)
    assert len(meta["shards"]) == len(read_manifest(shards)["shards"])


def test_centroids_of_another_feature_dimension_are_refused(fitted, tmp_path):
    shards, km = fitted
    other = tmp_path / "km"
    shutil.copytree(km, other)
    np.save(other / "centroids.npy", np.zeros((25, 40), np.float32))
    # A centroid file that is not the one kmeans.json describes (an interrupted or concurrent
    # fit) is refused before anything else.
    with pytest.raises(PretrainError, match="centroids.npy does not match the sha256 in its kmeans.json"):
        assign_labels(assign_cfg(shards, other), progress=False)
    record = json.loads((other / "kmeans.json").read_text())
    record["centroids_sha256"] = sha256_file(other / "centroids.npy")
    (other / "kmeans.json").write_text(json.dumps(record))
    with pytest.raises(PretrainError, match=r"centroids.npy has shape \(25, 40\)"):
        assign_labels(assign_cfg(shards, other), progress=False)


def test_a_kmeans_scored_in_memory_equals_its_stored_labels_and_never_writes(fitted, tmp_path):
    """``kmeans quality kmeans=DIR``, the held-out check, counts exactly what scoring the
    assigned label set counts, writes nothing into the shards, and scores a 100 Hz k-means
    against 50 Hz phones on every second frame."""
    from pretrain.cluster.quality import kmeans_counts, quality
    from pretrain.config.cluster import KmeansQualityConfig
    from pretrain.config.core import ConfigError

    shards, km = fitted
    assign_labels(assign_cfg(shards, km, "name=held"), progress=False)
    stored = quality(load_config(KmeansQualityConfig, [], [f"shards={shards}", "labels=held", "reference=phones100",
                                                           f"out={tmp_path / 'stored'}"]))
    before = sorted(p.name for p in (shards / "labels").iterdir())
    memory = quality(load_config(KmeansQualityConfig, [], [f"shards={shards}", f"kmeans={km}",
                                                           "reference=phones100", f"out={tmp_path / 'mem'}"]),
                     progress=False)
    assert sorted(p.name for p in (shards / "labels").iterdir()) == before
    for key in ("frames", "pnmi", "phone_purity", "cluster_purity", "usage_perplexity"):
        assert memory[key] == stored[key], key
    assert memory["labels"] is None and memory["kmeans"] == str(km.resolve())

    counts50, _, _ = kmeans_counts(shards, km, "phones50", progress=False)
    labels, phones = LabelSet(shards, "held"), LabelSet(shards, "phones50")
    expected = np.zeros_like(counts50)
    for shard in read_manifest(shards)["shards"]:
        z, y = labels.load_shard(shard["name"]), phones.load_shard(shard["name"])
        for key in y:
            n = min(len(y[key]), len(z[key][::2]))
            np.add.at(expected, (y[key][:n], z[key][::2][:n]), 1)
    assert (counts50 == expected).all() and 0 < counts50.sum() < memory["frames"]

    with pytest.raises(ConfigError, match="exactly one of 'labels' and 'kmeans'"):
        load_config(KmeansQualityConfig, [], [f"shards={shards}", "labels=held", f"kmeans={km}", "out=x"])


def test_a_label_file_that_is_not_the_one_meta_json_describes_is_refused(fitted, tmp_path):
    """Two runs writing a label set of one name, or a damaged file: the reader checks each
    file's sha256 against meta.json instead of training on someone else's labels."""
    shards, km = fitted
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    assign_labels(assign_cfg(copy, km, "name=mine"), progress=False)
    labels = LabelSet(copy, "mine")
    first = read_manifest(copy)["shards"][0]["name"]
    assert labels.load_shard(first)
    other = {k: v[::-1].copy() for k, v in labels.load_shard(first).items()}
    from pretrain.data.labels import write_label_shard

    write_label_shard(copy, "mine", first, other)  # what another run's assign would do
    with pytest.raises(PretrainError, match=f"label set 'mine': .*{first.removesuffix('.tar')}.npz does not match "
                                            "the sha256 in"):
        LabelSet(copy, "mine").load_shard(first)


@pytest.mark.parametrize("name", ["", "/abs", "a/../../b", "..", ".hidden", "x/y"])
def test_label_set_names_are_single_path_components(fitted, name):
    from pretrain.config.core import ConfigError

    shards, km = fitted
    with pytest.raises(ConfigError, match="field 'name'.*not a valid name"):
        assign_cfg(shards, km, f"name='{name}'")
    with pytest.raises(PretrainError, match="label set name: .*not a valid name"):
        label_dir(shards, name)


def test_a_received_manifest_with_a_path_for_a_shard_name_is_refused(fitted, tmp_path):
    shards, _ = fitted
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns("labels"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../outside.tar"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PretrainError, match=r"manifest.json: shard name: '../../outside.tar' is not a valid name"):
        read_manifest(copy)


def test_a_label_set_not_made_from_these_centroids_is_never_replaced_unasked(fitted):
    """The shards' gold phones50 (or another k-means) under the name given: refused, naming the
    set and its maker, and left byte for byte; overwrite=true replaces it."""
    shards, km = fitted
    gold = {p: p.read_bytes() for p in label_dir(shards, "phones50").iterdir() if p.is_file()}
    with pytest.raises(PretrainError, match=rf"label set {label_dir(shards, 'phones50')} already exists \(made by "
                                            r".*not from the centroids of .*\); set overwrite=true"):
        assign_labels(assign_cfg(shards, km, "name=phones50"), progress=False)
    assert {p: p.read_bytes() for p in label_dir(shards, "phones50").iterdir() if p.is_file()} == gold
    try:
        meta = assign_labels(assign_cfg(shards, km, "name=phones50", "overwrite=true"), progress=False)
        assert meta["num_classes"] == 25 and meta["provenance"]["made_by"] == "pretrain kmeans assign"
    finally:  # the module's other tests read the gold set
        shutil.rmtree(label_dir(shards, "phones50"))
        for path, data in gold.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
