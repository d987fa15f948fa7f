from __future__ import annotations

import shutil

import numpy as np
import pytest

from pretrain.probe.data import assign_splits, load_eval_set, segments, split_counts
from pretrain.utils import PretrainError


def test_splits_are_balanced_per_speaker_and_depend_only_on_the_speakers_keys():
    keys = [f"utt{i}" for i in range(60)]
    speakers = [f"s{i % 6}" for i in range(60)]
    splits = assign_splits(keys, speakers, 0, 0.6, 0.2)
    for s in set(speakers):
        mine = [sp for sp, who in zip(splits, speakers) if who == s]
        assert (mine.count("train"), mine.count("dev"), mine.count("test")) == (6, 2, 2)
    # Another order, and other speakers' utterances removed: the same split per key.
    order = np.random.default_rng(0).permutation(60)
    again = assign_splits([keys[i] for i in order], [speakers[i] for i in order], 0, 0.6, 0.2)
    assert {keys[i]: sp for i, sp in zip(order, again)} == dict(zip(keys, splits))
    only_s0 = [i for i in range(60) if speakers[i] == "s0"]
    alone = assign_splits([keys[i] for i in only_s0], ["s0"] * len(only_s0), 0, 0.6, 0.2)
    assert alone == [splits[i] for i in only_s0]
    assert assign_splits(keys, speakers, 1, 0.6, 0.2) != splits  # the seed matters
    assert split_counts(3, 0.6, 0.2) == (1, 1) and split_counts(4, 0.6, 0.2) == (2, 1)


def test_segments_are_runs_of_frame_labels():
    assert segments(np.array([0, 0, 3, 3, 3, 1, 0])) == [(0, 0, 2), (3, 2, 5), (1, 5, 6), (0, 6, 7)]
    assert segments(np.array([], dtype=int)) == []


def test_eval_set_from_shards_and_what_a_missing_reference_skips(small_shards, tmp_path):
    es = load_eval_set(small_shards)
    assert es.reference == "phones50" and len(es.utterances) == 40 and len(es.speakers) == 11
    assert es.skipped == {} and es.silence == 0 and es.num_phones == 40
    for u in es.utterances:
        from pretrain.frames import conv_num_frames

        assert len(u.phones) == conv_num_frames(len(u.audio))
    # phones100 read at every other frame gives the same 50 Hz labels (same frame centres).
    bare = tmp_path / "shards"
    shutil.copytree(small_shards, bare)
    shutil.rmtree(bare / "labels" / "phones50")
    es100 = load_eval_set(bare)
    assert es100.reference == "phones100"
    assert all(np.array_equal(a.phones, b.phones) for a, b in zip(es.utterances, es100.utterances))
    # No phone reference: the phone-based probes are skipped with the reason, the rest stays.
    shutil.rmtree(bare / "labels")
    none = load_eval_set(bare)
    assert none.reference is None and set(none.skipped) == {"abx", "phone", "pnmi"}
    assert "no phone reference" in none.skipped["phone"]
    with pytest.raises(PretrainError, match="reference label set 'phones99' not found"):
        load_eval_set(bare, reference="phones99")
    with pytest.raises(PretrainError, match="probe-dev is empty"):
        load_eval_set(small_shards, max_utterances=3)
