from __future__ import annotations

import numpy as np
import pytest

from pretrain.probe.abx import (_hier_mean, scorable_contexts, abx_errors, build_items, context_distances, dtw_pairs,
                                dtw_reference, unit_rows)
from pretrain.utils import PretrainError


def test_numba_dtw_equals_the_numpy_reference_on_random_pairs():
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(n, 7)) for n in (1, 2, 5, 9, 14, 3, 20)]
    seqs.append(np.zeros((4, 7)))  # zero rows: at 1 from every other row, 0 from each other
    seqs.append(np.concatenate([np.zeros((2, 7)), rng.normal(size=(3, 7))]))
    feats = np.concatenate(seqs)
    ends = np.cumsum([len(s) for s in seqs])
    starts = ends - [len(s) for s in seqs]
    pairs = np.array([(i, j) for i in range(len(seqs)) for j in range(len(seqs))])
    fast = dtw_pairs(unit_rows(feats), starts, ends, pairs)
    slow = np.array([dtw_reference(seqs[i], seqs[j]) for i, j in pairs])
    # arccos is ill-conditioned next to 1: a sequence against itself gives ~1e-9, not 0
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-8)
    assert fast[0] < 1e-8  # a sequence against itself
    assert np.all((fast >= 0) & (fast <= 1))
    zero = len(seqs) - 2
    assert fast[zero * len(seqs) + zero] == 0 and fast[zero * len(seqs)] == 1
    # Ties everywhere: the path length follows Libri-light's backtracking (diagonal, then left).
    x, y = np.ones((3, 2)), np.ones((5, 2))
    np.testing.assert_allclose(dtw_pairs(unit_rows(np.concatenate([x, y])), [0, 3], [3, 8], np.array([[0, 1]])),
                               [dtw_reference(x, y)], atol=1e-12)


def test_context_distances_cover_every_pair_of_a_context_and_equal_the_reference():
    rng = np.random.default_rng(5)
    seqs, spk, offsets = _corpus(rng, speakers=3, utts_per_speaker=4)
    items = build_items(seqs, offsets, spk, silence=0, max_per_group=5, seed=0)
    feats = rng.normal(size=(offsets[-1], 12))
    contexts = scorable_contexts(items)
    lookup = context_distances(feats, items, contexts)
    pairs = np.array(sorted({(min(a, b), max(a, b)) for a, b in lookup}))
    assert len(pairs) > 50
    direct = dtw_pairs(unit_rows(feats), items.starts, items.ends, pairs)
    np.testing.assert_allclose([lookup[tuple(p)] for p in pairs.tolist()], direct, rtol=0, atol=1e-8)
    a, b = pairs[0]
    assert abs(lookup[(a, b)] - dtw_reference(feats[items.starts[a]:items.ends[a]],
                                              feats[items.starts[b]:items.ends[b]])) < 1e-8


def _corpus(rng, speakers=4, utts_per_speaker=6, phones=6, length=40):
    """Utterances as runs of phones 1..phones-1 (0 is silence at both ends), 2-4 frames each."""
    seqs, spk = [], []
    for s in range(speakers):
        for _ in range(utts_per_speaker):
            runs = [0] + list(rng.integers(1, phones, size=length // 3)) + [0]
            seq = np.concatenate([[p] * rng.integers(2, 5) for p in runs])
            seqs.append(seq)
            spk.append(s)
    offsets = np.concatenate([[0], np.cumsum([len(q) for q in seqs])])
    return seqs, spk, offsets


def test_one_hot_phone_features_score_zero_and_random_features_about_half():
    rng = np.random.default_rng(1)
    seqs, spk, offsets = _corpus(rng)
    items = build_items(seqs, offsets, spk, silence=0, max_per_group=5, seed=0)
    labels = np.concatenate(seqs)
    one_hot = np.eye(6)[labels] + 0.01 * rng.normal(size=(len(labels), 6))
    perfect = abx_errors(one_hot, items)
    assert perfect["abx_within"] == 0.0 and perfect["abx_across"] == 0.0
    assert perfect["abx_triplets_within"] > 100 and perfect["abx_triplets_across"] > 300
    noise = abx_errors(rng.normal(size=(len(labels), 16)), items)
    assert 40 < noise["abx_within"] < 60 and 45 < noise["abx_across"] < 55


def test_items_are_capped_per_group_and_skip_silence():
    rng = np.random.default_rng(2)
    seqs, spk, offsets = _corpus(rng, speakers=2, utts_per_speaker=20, phones=3, length=60)
    items = build_items(seqs, offsets, spk, silence=0, max_per_group=3, seed=0)
    groups = {}
    for c, ctx, s in zip(items.centre, items.context, items.speaker):
        groups[(ctx, s, c)] = groups.get((ctx, s, c), 0) + 1
    assert max(groups.values()) == 3
    assert 0 not in items.centre
    again = build_items(seqs, offsets, spk, silence=0, max_per_group=3, seed=0)
    assert np.array_equal(items.starts, again.starts)  # the subsample is seeded


def test_too_few_triplets_is_an_error_naming_the_count():
    rng = np.random.default_rng(3)
    seqs, spk, offsets = _corpus(rng, speakers=1, utts_per_speaker=1, length=9)
    items = build_items(seqs, offsets, spk, silence=0, max_per_group=5, seed=0)
    with pytest.raises(PretrainError, match=r"too few ABX triplets: \d+ within and 0 across .* at least 100000"):
        abx_errors(rng.normal(size=(offsets[-1], 4)), items, min_triplets=100_000)


def test_scores_are_averaged_over_contexts_then_speakers_then_phone_pairs():
    # (context, speaker, a, b): speaker 0 has 1.0 and 0.0 in two contexts, speaker 1 has 1.0.
    scores = {(0, 0, 1, 2): 1.0, (1, 0, 1, 2): 0.0, (0, 1, 1, 2): 1.0, (0, 0, 2, 1): 0.5}
    # Pair (1, 2): speaker 0 averages to 0.5 over its contexts, speaker 1 has 1.0 -> 0.75 (a flat
    # mean of the three would give 2/3); with pair (2, 1) at 0.5 the phone pairs average 0.625.
    assert _hier_mean({k: v for k, v in scores.items() if k[2:] == (1, 2)}, [[0], [1]]) == 0.75
    assert _hier_mean(scores, [[0], [1]]) == 0.625
    # across keys (context, speaker A/B, speaker X, a, b): speaker pairs averaged together
    across = {(0, 0, 1, 1, 2): 1.0, (1, 0, 1, 1, 2): 0.0, (0, 1, 0, 1, 2): 1.0}
    assert _hier_mean(across, [[0], [1, 2]]) == 0.75
