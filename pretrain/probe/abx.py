"""ABX phone discriminability, within and across speakers (ZeroSpeech / Libri-light style).

Items come from the 50 Hz phone labels: every occurrence of a phone whose neighbours exist and
none of the three is silence is a *triphone item* ``(prev, centre, next)`` spoken by one
speaker; its frames are the whole triphone span (the previous phone's first frame to the next
phone's last). A context is ``(prev, next)``. An (A, B, X) triplet has A and X of the same
triphone, and B of the same context with another centre phone: the representation is right
when ``d(A, X) < d(B, X)`` (a tie counts one half), and the ABX error is the share it gets
wrong.

- *within speaker*: A, B and X from one speaker; a score per (context, speaker, a, b), averaged
  over contexts, then over speakers, then over the ordered phone pairs (a, b);
- *across speakers*: A and B from one speaker, X from another; a score per (context, speaker
  of A/B, speaker of X, a, b), averaged over (context, speaker of X), then over the speaker of
  A/B, then over phone pairs.

``d`` is the dynamic-time-warping distance between the two items' frame sequences under the
frame-wise angular distance ``arccos(cos(u, v)) / pi`` (0 .. 1), normalized by the length of
the best path, with steps (1, 0), (0, 1), (1, 1). The DTW (frame distances and recursion) is
compiled with numba and runs over all pairs of a layer in parallel; ``dtw_reference`` is the
plain numpy version it is tested against.

The rules are Libri-light's ``eval_ABX`` (facebookresearch/libri-light, ``eval/ABX_src``),
re-derived, so that a number here sits next to a published one; ``tests/probe/
test_abx_librilight.py`` runs that implementation on the same features and item file:

- a zero frame is at distance 1 from every other frame and 0 from another zero frame (its
  "singularity" normalization);
- the path length is that of the path its backtracking follows: from the end, diagonal when it
  costs no more than either neighbour, else left (one frame of the second item back) when it
  costs no more than up, else up. Following the same choice forward gives the same length;
- across speakers, the scores are averaged over (context, speaker of X) together, then over
  the speaker of A and B, then over phone pairs;
- ``read_item_file`` reads its ``.item`` files (``#file onset offset #phone prev next
  speaker``), with its frame rule: frames ``ceil(onset/step - 0.5)`` to ``floor(offset/step -
  0.5)``, end exclusive.

What differs: items are subsampled once, with a fixed seed, to at most ``max_per_group`` per
(context, speaker, centre phone), where ``eval_ABX`` draws up to ``max_size_group`` (10) anew
for every triplet group (so its number moves by a few hundredths between runs); across
speakers every other speaker serves as X, where it samples 5 (``max_x_across``). With groups
under both caps the two give the same number. Computation is float64 (theirs float32).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from pretrain.probe.data import segments
from pretrain.utils import PretrainError

log = logging.getLogger(__name__)


@numba.njit(cache=True, nogil=True)
def _dtw(x: np.ndarray, y: np.ndarray, x_null: np.ndarray, y_null: np.ndarray) -> float:
    n, m, dim = x.shape[0], y.shape[0], x.shape[1]
    cost = np.empty((n, m))
    length = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            if x_null[i] or y_null[j]:
                d = 0.0 if (x_null[i] and y_null[j]) else 1.0
            else:
                dot = 0.0
                for k in range(dim):
                    dot += x[i, k] * y[j, k]
                dot = min(1.0, max(-1.0, dot))
                d = math.acos(dot) / math.pi
            if i == 0 and j == 0:
                cost[i, j], length[i, j] = d, 1.0
                continue
            # The step Libri-light's backtracking takes: diagonal unless a neighbour is strictly
            # cheaper, then left (j - 1) unless up is strictly cheaper. On an edge the only step.
            if i == 0:
                pi_, pj = 0, j - 1
            elif j == 0:
                pi_, pj = i - 1, 0
            else:
                diag, left, up = cost[i - 1, j - 1], cost[i, j - 1], cost[i - 1, j]
                if diag <= left and diag <= up:
                    pi_, pj = i - 1, j - 1
                elif left <= up:
                    pi_, pj = i, j - 1
                else:
                    pi_, pj = i - 1, j
            cost[i, j], length[i, j] = cost[pi_, pj] + d, length[pi_, pj] + 1.0
    return cost[n - 1, m - 1] / length[n - 1, m - 1]


@numba.njit(parallel=True, cache=True)
def _dtw_pairs(feats: np.ndarray, null: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               pairs: np.ndarray) -> np.ndarray:
    out = np.empty(pairs.shape[0])
    for p in numba.prange(pairs.shape[0]):
        a, b = pairs[p, 0], pairs[p, 1]
        out[p] = _dtw(feats[starts[a]:ends[a]], feats[starts[b]:ends[b]], null[starts[a]:ends[a]],
                      null[starts[b]:ends[b]])
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float64 for the kernel."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def dtw_pairs(feats: np.ndarray, starts: np.ndarray, ends: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """DTW distance of each (item, item) pair; ``feats`` rows already unit length (or zero)."""
    if len(pairs) == 0:
        return np.zeros(0)
    feats = np.ascontiguousarray(feats, dtype=np.float64)
    null = ~np.any(feats != 0, axis=1)
    return _dtw_pairs(feats, null, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                      np.ascontiguousarray(pairs, dtype=np.int64))


def dtw_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The same DTW in plain numpy and Python, written the other way round (slow; the numba
    kernel's reference): the whole cost matrix first, then the path length by backtracking."""
    x, y = unit_rows(x), unit_rows(y)
    d = np.arccos(np.clip(x @ y.T, -1.0, 1.0)) / np.pi
    x_null, y_null = ~np.any(x != 0, axis=1), ~np.any(y != 0, axis=1)
    d[x_null[:, None] | y_null[None, :]] = 1.0
    d[x_null[:, None] & y_null[None, :]] = 0.0
    n, m = d.shape
    cost = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            prev = [c for c in ((cost[i - 1, j] if i else None), (cost[i, j - 1] if j else None),
                                (cost[i - 1, j - 1] if i and j else None)) if c is not None]
            cost[i, j] = d[i, j] + (min(prev) if prev else 0.0)
    i, j, steps = n - 1, m - 1, 1
    while i > 0 and j > 0:
        diag, left, up = cost[i - 1, j - 1], cost[i, j - 1], cost[i - 1, j]
        if diag <= left and diag <= up:
            i, j = i - 1, j - 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
        steps += 1
    return float(cost[-1, -1] / (steps + i + j))


@dataclass
class Items:
    """Triphone items: frame spans into the concatenated features, and their labels."""

    starts: np.ndarray
    ends: np.ndarray
    centre: np.ndarray
    context: np.ndarray
    """Index of the (prev, next) pair."""
    speaker: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def build_items(phones: list[np.ndarray], offsets: np.ndarray, speakers: list[int], silence: int | None,
                max_per_group: int, seed: int) -> Items:
    """Triphone items of the given utterances (``offsets[i]`` is utterance i's first frame in
    the concatenated features), at most ``max_per_group`` per (context, speaker, centre)."""
    groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for u, y in enumerate(phones):
        segs = segments(y)
        for (p, s0, _), (c, _, _), (n, _, e2) in zip(segs, segs[1:], segs[2:]):
            if silence is not None and silence in (p, c, n):
                continue
            groups[((p, n), speakers[u], c)].append((int(offsets[u] + s0), int(offsets[u] + e2)))
    return _subsample(groups, max_per_group, seed)


def _subsample(groups: dict[tuple, list[tuple[int, int]]], max_per_group: int, seed: int) -> Items:
    """Items of ``groups`` ((context, speaker, centre) -> frame spans), at most ``max_per_group``
    of each, a seeded choice in the groups' sorted order."""
    rng = np.random.default_rng(seed)
    contexts: dict = {}
    rows = []
    for key in sorted(groups):
        ctx, speaker, centre = key
        spans = groups[key]
        if len(spans) > max_per_group:
            spans = [spans[i] for i in np.sort(rng.choice(len(spans), max_per_group, replace=False))]
        ctx_id = contexts.setdefault(ctx, len(contexts))
        rows += [(a, b, centre, ctx_id, speaker) for a, b in spans]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return Items(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4])


def read_item_file(path: str | Path, keys: list[str], offsets: np.ndarray, max_per_group: int, seed: int,
                   feature_size: float = 0.02) -> tuple[Items, dict]:
    """Items of a Libri-light ``.item`` file on the evaluation set's utterances.

    A line's file ID names the utterance whose key is it or ends in ``/<ID>`` (a LibriSpeech
    folder's shard keys end in the file's stem). Frames follow ``eval_ABX``: ``ceil(onset /
    feature_size - 0.5)`` up to ``floor(offset / feature_size - 0.5)``, end exclusive, within the
    utterance. Items of files not in the set, and spans with no frame, are counted (``eval_ABX``
    drops both silently); phones, contexts and speakers are the file's names.
    """
    path = Path(path)
    by_id: dict[str, int] = {}
    for u, key in enumerate(keys):
        for name in {key, key.rsplit("/", 1)[-1]}:
            if name in by_id and keys[by_id[name]] != key:
                raise PretrainError(f"{path}: file ID '{name}' would name two utterances, '{keys[by_id[name]]}' "
                                    f"and '{key}'; give the item file full keys")
            by_id[name] = u
    step = 1 / feature_size
    groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    phones: dict[str, int] = {}
    speakers: dict[str, int] = {}
    lines = unmatched = empty = 0
    missing: list[str] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 or not line.strip():
                continue  # the header, whatever it says (eval_ABX skips it too)
            fields = line.split()
            if len(fields) != 7:
                raise PretrainError(f"{path}:{lineno}: expected 7 fields (#file onset offset #phone prev-phone "
                                    f"next-phone speaker), got {len(fields)}: {line.strip()!r}")
            file_id, onset, offset, phone, prev, nxt, speaker = fields
            try:
                onset_s, offset_s = float(onset), float(offset)
            except ValueError:
                raise PretrainError(f"{path}:{lineno}: onset and offset must be seconds, got {onset!r} {offset!r}")
            lines += 1
            u = by_id.get(file_id)
            if u is None:
                unmatched += 1
                if len(missing) < 3 and file_id not in missing:
                    missing.append(file_id)
                continue
            n = int(offsets[u + 1] - offsets[u])
            start = max(0, int(math.ceil(step * onset_s - 0.5)))
            end = min(n, int(math.floor(step * offset_s - 0.5)))
            if start >= n or end <= start:
                empty += 1
                continue
            centre = phones.setdefault(phone, len(phones))
            spk = speakers.setdefault(speaker, len(speakers))
            groups[((prev, nxt), spk, centre)].append((int(offsets[u] + start), int(offsets[u] + end)))
    if not groups:
        raise PretrainError(f"{path}: none of its {lines} items falls on the evaluation set ({unmatched} name files "
                            f"not in it, e.g. {', '.join(missing) or '-'}; {empty} have no frame)")
    if unmatched:
        log.warning("%s: %d of %d items name files not in the evaluation set (e.g. %s); they are left out",
                    path, unmatched, lines, ", ".join(missing))
    if empty:
        log.warning("%s: %d items have no 50 Hz frame inside their utterance; left out", path, empty)
    stats = {"item_file": str(path.resolve()), "lines": lines, "unmatched": unmatched, "empty": empty,
             "phones": len(phones), "speakers": len(speakers)}
    return _subsample(groups, max_per_group, seed), stats


def scorable_contexts(items: Items) -> list[np.ndarray]:
    """Item indices of every context holding at least two centre phones (the only ones that
    give triplets)."""
    by_ctx: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(items.context):
        by_ctx[int(c)].append(i)
    return [np.array(ix) for ix in by_ctx.values() if len(set(items.centre[ix].tolist())) > 1]


def _triplet_score(d_ax: np.ndarray, d_bx: np.ndarray, exclude_same: bool) -> tuple[float, int]:
    """Mean of [d(A,X) < d(B,X)] + 0.5 [=] over A (rows of d_ax), X (columns) and B (rows of
    d_bx); with ``exclude_same`` A and X come from one set and A = X is left out."""
    lt = (d_ax[:, :, None] < d_bx.T[None, :, :]).astype(np.float64)
    eq = (d_ax[:, :, None] == d_bx.T[None, :, :]).astype(np.float64)
    s = lt + 0.5 * eq  # (A, X, B)
    if exclude_same:
        keep = ~np.eye(d_ax.shape[0], dtype=bool)
        s = s[keep]
        n = int(keep.sum()) * d_bx.shape[0]
    else:
        n = s.size
    return (float(s.sum() / n), n) if n else (float("nan"), 0)


def context_distances(feats: np.ndarray, items: Items, contexts: list[np.ndarray]) -> dict[tuple[int, int], float]:
    """DTW distance of every item pair inside each context (both orders as keys), all pairs in
    one parallel kernel call (``benchmarks/probe_cost.py`` times it against the numpy DTW)."""
    pairs = [np.stack([ix[a], ix[b]], 1) for ix in contexts for a, b in [np.triu_indices(len(ix), 1)]]
    if not pairs:
        return {}
    flat = np.concatenate(pairs)
    dist = dtw_pairs(unit_rows(feats), items.starts, items.ends, flat)
    lookup: dict[tuple[int, int], float] = {}
    for (a, b), d in zip(flat.tolist(), dist.tolist()):
        lookup[(a, b)] = lookup[(b, a)] = d
    return lookup


def abx_errors(feats: np.ndarray, items: Items, min_triplets: int = 1) -> dict:
    """Within- and across-speaker ABX error (%) of ``feats`` (frames, dim) on ``items``."""
    contexts = scorable_contexts(items)
    lookup = context_distances(feats, items, contexts)
    within: dict[tuple, float] = {}
    across: dict[tuple, float] = {}
    n_within = n_across = 0
    for ix in contexts:
        m = len(ix)
        d = np.zeros((m, m))
        for a in range(m):
            for b in range(a + 1, m):
                d[a, b] = d[b, a] = lookup[(int(ix[a]), int(ix[b]))]
        ctx = int(items.context[ix[0]])
        cen, spk = items.centre[ix], items.speaker[ix]
        cells = defaultdict(list)
        for local, (c, s) in enumerate(zip(cen.tolist(), spk.tolist())):
            cells[(s, c)].append(local)
        for (s1, a), ia in cells.items():
            for (s2, b), ib in cells.items():
                if b == a or s2 != s1:
                    continue
                if len(ia) >= 2:  # within: A, X from (s1, a), B from (s1, b)
                    score, n = _triplet_score(d[np.ix_(ia, ia)], d[np.ix_(ib, ia)], exclude_same=True)
                    within[(ctx, s1, a, b)] = score
                    n_within += n
                for (s3, a3), ix_x in cells.items():  # across: X from (s3 != s1, a)
                    if a3 != a or s3 == s1:
                        continue
                    score, n = _triplet_score(d[np.ix_(ia, ix_x)], d[np.ix_(ib, ix_x)], exclude_same=False)
                    across[(ctx, s1, s3, a, b)] = score
                    n_across += n
    if n_within + n_across < min_triplets:
        raise PretrainError(f"too few ABX triplets: {n_within} within and {n_across} across speakers from "
                            f"{len(items)} items, but at least {min_triplets} are needed (abx.min_triplets); "
                            "probe more evaluation utterances or raise abx.max_per_group")
    # within keys (ctx, s, a, b): contexts, then speakers, then phone pairs
    w = _hier_mean(within, [[0], [1]])
    # across keys (ctx, s1, s2, a, b): (context, speaker of X) together, then the speaker of A
    # and B, then phone pairs (Libri-light's order)
    x = _hier_mean(across, [[0, 2], [1]])
    return {"abx_within": 100 * (1 - w) if not math.isnan(w) else None,
            "abx_across": 100 * (1 - x) if not math.isnan(x) else None,
            "abx_items": len(items), "abx_pairs": len(lookup) // 2,
            "abx_triplets_within": n_within, "abx_triplets_across": n_across}


def _hier_mean(scores: dict[tuple, float], steps: list[list[int]]) -> float:
    """Average out the key positions of each step in turn (positions of the original key), then
    take the mean of what is left (the phone pairs)."""
    if not scores:
        return float("nan")
    current, removed = dict(scores), set()
    for drop in steps:
        removed |= set(drop)
        grouped: dict[tuple, list[float]] = defaultdict(list)
        for key, v in current.items():
            grouped[tuple(None if i in removed else k for i, k in enumerate(key))].append(v)
        current = {k: float(np.mean(v)) for k, v in grouped.items()}
    return float(np.mean(list(current.values())))
