from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import ConfigError, load_config
from pretrain.config.data import DataConfig
from pretrain.phones import PHONE_ID
from pretrain.data.audio import decode
from pretrain.data.labels import LabelError, LabelSet, write_label_meta, write_label_shard
from pretrain.data.pipeline import DataError, ShardLoader, assign_shards
from pretrain.data.shards import iter_shard, read_manifest
from pretrain.frames import num_frames
from pretrain.utils import PretrainError

from tests.data.resume_child import signature
from tests.data.test_shards import flip_flac_magic

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("resume_child.py")
REPO = Path(__file__).resolve().parents[2]

# Small batches so that 40 utterances make a dozen or more batches.
BASE = ["max_tokens=200000", "max_sample_size=96000", "min_sample_size=0", "bucket_size=8",
        "shuffle_window=3", "pad_audio=true"]


def data_cfg(shards: Path, *overrides: str) -> list[str]:
    return [f"shards={shards}", *BASE, *overrides]


def make_loader(overrides: list[str], rank=0, world=1) -> ShardLoader:
    return ShardLoader(load_config(DataConfig, [], overrides), rank=rank, world_size=world)


def manifest_keys(shards: Path) -> list[str]:
    return [s["__key__"] for e in read_manifest(shards)["shards"] for s in iter_shard(shards / e["name"])]


def epoch_signatures(loader: ShardLoader) -> list:
    return [signature(b) for b in loader]


def test_assignment_covers_every_shard_once_and_balances():
    counts = [4, 9, 1, 7, 3, 3, 8, 2]
    for slots in (1, 3, 5):
        plan = assign_shards(counts, slots, seed=2, epoch=5, shuffle=True)
        assert sorted(i for s in plan for i in s) == list(range(8))
        loads = [sum(counts[i] for i in s) for s in plan]
        assert max(loads) - min(loads) <= max(counts)
    assert assign_shards(counts, 3, 2, 5, True) == assign_shards(counts, 3, 2, 5, True)
    assert assign_shards(counts, 3, 2, 5, True) != assign_shards(counts, 3, 2, 6, True)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_epoch_covers_every_key_exactly_once(small_shards, world, workers):
    keys = []
    for rank in range(world):
        loader = make_loader(data_cfg(small_shards, f"num_workers={workers}"), rank, world)
        for batch in loader:
            keys.extend(batch["keys"])
            assert batch["audio"].shape[0] * batch["audio"].shape[1] <= 200000
    expected = manifest_keys(small_shards)
    assert len(keys) == len(expected) == 40
    assert sorted(keys) == sorted(expected)  # 0 missing, 0 duplicated


def test_two_fresh_loaders_agree_and_epochs_differ(small_shards):
    cfg = data_cfg(small_shards, "num_workers=2")
    a, b = make_loader(cfg), make_loader(cfg)
    first_a, first_b = epoch_signatures(a), epoch_signatures(b)
    assert first_a == first_b
    assert epoch_signatures(a) != first_a  # epoch 1 has its own order and crops
    assert epoch_signatures(make_loader(data_cfg(small_shards, "num_workers=2", "seed=9"))) != first_a


def run_children(overrides: list[str], jobs: list[tuple[dict, int]], tmp_path: Path, rank=0, world=1) -> list:
    """What follows each ``(state, count)`` of ``jobs``, each resumed by a new loader in one
    fresh process (see resume_child.py)."""
    states_path = tmp_path / "states.json"
    states_path.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(overrides), str(states_path), str(rank),
                           str(world)], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def interrupted(cfg: list[str], k: int) -> tuple[list, dict]:
    """The first ``k`` batches of a new loader, and its state then, as a checkpoint stores it."""
    loader = make_loader(cfg)
    batches = iter(loader)
    taken = [signature(next(batches)) for _ in range(k)]
    return taken, json.loads(json.dumps(loader.state_dict()))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_continues_exactly(small_shards, tmp_path, workers):
    cfg = data_cfg(small_shards, f"num_workers={workers}")
    # Uninterrupted: epochs 0 and 1.
    full = make_loader(cfg)
    epoch0, epoch1 = epoch_signatures(full), epoch_signatures(full)
    n = len(epoch0)
    assert n >= 8
    points = sorted({0, 1, n // 2, n - 1})
    runs = [interrupted(cfg, k) for k in points]  # k batches consumed, then killed
    rests = run_children(cfg, [(state, 2) for _, state in runs], tmp_path)  # rest of epoch 0, then epoch 1
    for k, (taken, _), rest in zip(points, runs, rests):
        assert taken + rest == epoch0 + epoch1, f"interrupted after {k} of {n} batches"


@pytest.mark.parametrize("workers", [0, 2])
def test_infinite_mode_resumes_across_epoch_boundaries(small_shards, tmp_path, workers):
    cfg = data_cfg(small_shards, f"num_workers={workers}", "infinite=true")
    reference = []
    for batch in make_loader(cfg):
        reference.append(signature(batch))
        if len(reference) == 45:  # more than two epochs' worth
            break
    if workers == 0:  # one stream: its first 40 utterances are exactly epoch 0
        first_epoch = [k for sig in reference for k, _, _ in sig][:40]
        assert sorted(first_epoch) == sorted(manifest_keys(small_shards))
    runs = [interrupted(cfg, k) for k in (13, 27)]
    rests = run_children(cfg, [(state, 45 - len(taken)) for taken, state in runs], tmp_path)
    for (taken, _), rest in zip(runs, rests):
        assert taken + rest == reference


def test_resume_refuses_another_partition(small_shards):
    loader = make_loader(data_cfg(small_shards, "num_workers=2"))
    state = loader.state_dict()
    with pytest.raises(PretrainError, match="saved with num_workers=2, now num_workers=1"):
        make_loader(data_cfg(small_shards, "num_workers=1")).load_state_dict(state)
    with pytest.raises(PretrainError, match="world_size=1, now world_size=2"):
        make_loader(data_cfg(small_shards, "num_workers=2"), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        make_loader(data_cfg(small_shards, "num_workers=2")).load_state_dict({**state, "extra": 1})


def test_another_world_size_starts_the_next_epoch_on_every_new_stream(small_shards, caplog):
    # Two ranks read part of epoch 0, then three ranks take over: the documented policy starts
    # epoch 1 on all new streams, so that epoch is covered exactly once.
    cfg = data_cfg(small_shards, "num_workers=0")
    states = []
    for rank in range(2):
        loader = make_loader(cfg, rank, 2)
        batches = iter(loader)
        next(batches)
        states.append(json.loads(json.dumps(loader.state_dict())))
    keys = []
    for rank in range(3):
        loader = make_loader(cfg, rank, 3)
        with caplog.at_level("WARNING"):
            assert loader.load_repartitioned(states) == 1
        assert loader.epoch == 1
        epoch = list(loader)
        keys.extend(k for b in epoch for k in b["keys"])
        fresh = make_loader(cfg, rank, 3)
        list(fresh)  # its epoch 0
        assert [signature(b) for b in epoch] == epoch_signatures(fresh)  # = a fresh loader's epoch 1
    assert sorted(keys) == sorted(manifest_keys(small_shards))
    assert "world_size 2 -> 3" in caplog.text and "the unread rest of epoch 0 is skipped" in caplog.text
    with pytest.raises(PretrainError, match="saved with seed=1, now seed=5"):
        make_loader(data_cfg(small_shards, "num_workers=0", "seed=5"), 0, 3).load_repartitioned(states)


def test_crops_keep_labels_on_their_frames(small_shards):
    # Long utterances cropped at random offsets: audio and both label sets must be the slice
    # of the originals that the offset and the frame grids imply.
    cfg = data_cfg(small_shards, "num_workers=0", "labels=[phones50,phones100]", "max_sample_size=24000")
    originals = {}
    for entry in read_manifest(small_shards)["shards"]:
        for s in iter_shard(small_shards / entry["name"]):
            originals[s["__key__"]] = (decode(s["flac"]), json.loads(s["align.json"]))
    offsets_seen = set()
    for batch in make_loader(cfg):
        for i, key in enumerate(batch["keys"]):
            audio, align = originals[key]
            off, n = int(batch["offsets"][i]), int(batch["lengths"][i])
            offsets_seen.add(off)
            assert off % 320 == 0 and n == min(len(audio), 24000)
            np.testing.assert_array_equal(batch["audio"][i, :n].numpy(), audio[off:off + n])
            assert not batch["padding_mask"][i, :n].any() and batch["padding_mask"][i, n:].all()
            ends = np.array([e for _, _, e in align["segments"]])
            ids = np.array([PHONE_ID[p] for p, _, _ in align["segments"]])
            for rate, hop in ((50, 320), (100, 160)):
                frames = num_frames(n, rate)
                centres = off + np.arange(frames) * hop + 200
                expected = ids[np.searchsorted(ends, centres, side="right")]
                got = batch["labels"][f"phones{rate}"][i]
                np.testing.assert_array_equal(got[:frames].numpy(), expected)
                assert (got[frames:] == -100).all()
    assert len(offsets_seen) > 5


def test_without_pad_audio_batches_are_cropped_to_their_shortest(small_shards):
    lengths_seen = 0
    for batch in make_loader(data_cfg(small_shards, "num_workers=0", "pad_audio=false",
                                      "labels=[phones50]")):
        n = int(batch["lengths"][0])
        assert (batch["lengths"] == n).all() and batch["audio"].shape[1] == n
        assert not batch["padding_mask"].any()
        assert batch["labels"]["phones50"].shape[1] == num_frames(n, 50)
        assert (batch["offsets"] % 320 == 0).all()
        lengths_seen += 1
    assert lengths_seen > 3


def test_label_length_mismatch_and_missing_key_name_shard_and_key(small_shards, tmp_path):
    shards = Path(shutil.copytree(small_shards, tmp_path / "s"))
    phones = LabelSet(shards, "phones50")
    entries = {}
    for entry in read_manifest(shards)["shards"]:
        labels = phones.load_shard(entry["name"])
        if entry["name"] == "shard-000002.tar":
            victim = sorted(labels)[0]
            labels[victim] = labels[victim][:-5]
        entries[entry["name"]] = write_label_shard(shards, "short", entry["name"], labels)
    write_label_meta(shards, "short", 50, 40, entries, {"test": True})
    with pytest.raises(LabelError, match=rf"shard shard-000002.tar, key '{victim}': \d+ labels, but \d+ "
                                         r"samples give \d+ frames at 50 Hz"):
        for _ in make_loader(data_cfg(shards, "num_workers=0", "labels=[short]", "shuffle=false")):
            pass
    entries = {}
    for entry in read_manifest(shards)["shards"]:
        labels = phones.load_shard(entry["name"])
        if entry["name"] == "shard-000004.tar":
            victim = sorted(labels)[1]
            del labels[victim]
        entries[entry["name"]] = write_label_shard(shards, "holey", entry["name"], labels)
    write_label_meta(shards, "holey", 50, 40, entries, {"test": True})
    with pytest.raises(LabelError, match=rf"shard shard-000004.tar: no labels for key '{victim}'"):
        for _ in make_loader(data_cfg(shards, "num_workers=0", "labels=[holey]")):
            pass
    with pytest.raises(LabelError, match="label set 'nope' not found"):
        make_loader(data_cfg(shards, "labels=[nope]"))


def test_corrupt_sample_raises_or_is_skipped_and_not_reread(small_shards, tmp_path):
    shards = Path(shutil.copytree(small_shards, tmp_path / "s"))
    bad_key = flip_flac_magic(shards / "shard-000005.tar", which=2)
    with pytest.raises(DataError, match=rf"shard shard-000005.tar, key '{bad_key}'"):
        for _ in make_loader(data_cfg(shards, "num_workers=0")):
            pass
    cfg = data_cfg(shards, "num_workers=2", "on_error=skip")
    loader = make_loader(cfg)
    keys = [k for b in loader for k in b["keys"]]
    assert bad_key not in keys and len(keys) == 39
    assert loader.metrics()["decode_errors"] == 1
    # Interrupt after the bad sample's batch, resume: it is not decoded or counted again.
    loader = make_loader(cfg)
    seen = []
    for batch in loader:
        seen.extend(batch["keys"])
        if loader.metrics()["decode_errors"] == 1:
            break
    resumed = make_loader(cfg)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    rest = [k for b in resumed for k in b["keys"]]
    assert sorted(seen + rest) == sorted(keys)
    assert resumed.metrics()["decode_errors"] == 1


def test_truncated_shard_raises_or_is_skipped(small_shards, tmp_path):
    shards = Path(shutil.copytree(small_shards, tmp_path / "s"))
    data = (shards / "shard-000006.tar").read_bytes()
    (shards / "shard-000006.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard shard-000006.tar: unreadable after"):
        for _ in make_loader(data_cfg(shards, "num_workers=0")):
            pass
    loader = make_loader(data_cfg(shards, "num_workers=0", "on_error=skip"))
    keys = [k for b in loader for k in b["keys"]]
    assert 36 <= len(keys) < 40 and len(set(keys)) == len(keys)
    assert loader.metrics()["read_errors"] == 1


def test_short_utterances_are_dropped_and_counted(small_shards):
    loader = make_loader(data_cfg(small_shards, "num_workers=0", "min_sample_size=48000"))
    keys = [k for b in loader for k in b["keys"]]
    metrics = loader.metrics()
    assert metrics["too_short"] > 0 and len(keys) + metrics["too_short"] == 40


def test_too_few_shards_for_the_streams_is_a_clear_error(small_shards):
    with pytest.raises(PretrainError, match="10 shards, fewer than the 12 streams"):
        make_loader(data_cfg(small_shards, "num_workers=4"), 0, 3)


def test_data_config_validation():
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, [], ["shards=x", "max_tokens=1000"])
    assert e.value.field == "max_tokens"
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, [], ["shards=x", "on_error=ignore"])
    assert e.value.field == "on_error"
