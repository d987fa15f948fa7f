from __future__ import annotations

import numpy as np
import torch

from pretrain.probe.linear import (ctc_probe, edit_distance, frame_probe, greedy_decode, merge_runs, merge_silence,
                                   speaker_probe)


def test_edit_distance_and_greedy_decoding():
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [4, 5]) == 2 and edit_distance([1, 2], [2, 1]) == 2
    blank = 9
    # frames: 1 1 blank 1 2 2 0 0 blank 0 -> 1 1 2 0 0 -> silence (0) runs merged -> 1 1 2 0
    logits = torch.nn.functional.one_hot(torch.tensor([1, 1, blank, 1, 2, 2, 0, 0, blank, 0]), 10).float()
    assert greedy_decode(logits, blank, silence=0) == [1, 1, 2, 0]
    assert merge_runs([0, 0, 3, 3, 0]) == [0, 3, 0] and merge_silence([0, 0, 3, 3, 0], 0) == [0, 3, 3, 0]


def _data(rng, utts=30, frames=50, classes=5, dim=8, informative=True):
    phones = [np.repeat(rng.integers(0, classes, size=frames // 5), 5) for _ in range(utts)]
    centres = rng.normal(size=(classes, dim)) * 3
    feats = [centres[p] + rng.normal(size=(len(p), dim)) if informative else rng.normal(size=(len(p), dim))
             for p in phones]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in phones])])
    split = ["train"] * (utts // 2) + ["dev"] * (utts // 4) + ["test"] * (utts - utts // 2 - utts // 4)
    return phones, np.concatenate(feats).astype(np.float32), offsets, split


def test_linear_probes_learn_separable_data_and_not_noise():
    rng = np.random.default_rng(0)
    codes = {"train": 0, "dev": 1, "test": 2}
    phones, x, offsets, split = _data(rng)
    frame_split = np.repeat([codes[s] for s in split], np.diff(offsets))
    res = frame_probe([x], np.concatenate(phones), frame_split, 5, [1e-2, 1e-1], 20, 256, 0)
    assert res["phone_acc"] > 95 and set(res["phone_acc_dev_by_lr"]) == {"0.01", "0.1"}
    ctc = ctc_probe([x], offsets, phones, split, 5, None, [1e-2, 1e-1], 4, 4096, 0, init=res["_head"])
    assert ctc["per"] < 20
    _, noise, _, _ = _data(rng, informative=False)
    assert frame_probe([noise], np.concatenate(phones), frame_split, 5, [1e-2], 20, 256, 0)["phone_acc"] < 40
    # The weighted sum finds the informative one of two layers.
    both = frame_probe([noise, x], np.concatenate(phones), frame_split, 5, [1e-1], 20, 256, 0)
    assert both["layer_weights"][1] > 0.6 and both["phone_acc"] > 90


def test_speaker_probe_on_pooled_features():
    rng = np.random.default_rng(1)
    speakers = [f"s{i % 4}" for i in range(40)]
    means = {s: rng.normal(size=6) * 2 for s in set(speakers)}
    lens = rng.integers(5, 20, size=40)
    x = np.concatenate([means[s] + rng.normal(size=(n, 6)) for s, n in zip(speakers, lens)]).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    split = (["train"] * 3 + ["dev", "test"]) * 8
    res = speaker_probe([x], offsets, speakers, split, [1e-2, 1e-1], 100, 0)
    assert res["speaker_acc"] == 100.0 and res["speakers"] == 4
