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
  of A/B, speaker of X, a, b), averaged over contexts, then over speaker pairs, then over
  phone pairs.

``d`` is the dynamic-time-warping distance between the two items' frame sequences under the
frame-wise angular distance ``arccos(cos(u, v)) / pi`` (0 .. 1; a zero vector is at 0.5 from
everything), normalized by the length of the best path, with steps (1, 0), (0, 1), (1, 1). The
DTW (frame distances and recursion) is compiled with numba and runs over all pairs of a layer
in parallel; ``dtw_reference`` is the plain numpy version it is tested against.

Items are subsampled with a fixed seed to at most ``max_per_group`` per (context, speaker,
centre phone), so a layer costs seconds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numba
import numpy as np

from pretrain.probe.data import segments
from pretrain.utils import PretrainError


@numba.njit(cache=True, nogil=True)
def _dtw(x: np.ndarray, y: np.ndarray) -> float:
    n, m, dim = x.shape[0], y.shape[0], x.shape[1]
    cost = np.empty((n, m))
    length = np.empty((n, m))
    for i in range(n):
        for j in range(m):
            dot = 0.0
            for k in range(dim):
                dot += x[i, k] * y[j, k]
            dot = min(1.0, max(-1.0, dot))
            d = math.acos(dot) / math.pi
            if i == 0 and j == 0:
                cost[i, j], length[i, j] = d, 1.0
                continue
            # Candidates in a fixed order (diagonal, up, left), strictly smaller wins: the
            # reference makes the same choice, so both give the same path on ties.
            best, best_len = np.inf, 0.0
            if i > 0 and j > 0:
                best, best_len = cost[i - 1, j - 1], length[i - 1, j - 1]
            if i > 0 and cost[i - 1, j] < best:
                best, best_len = cost[i - 1, j], length[i - 1, j]
            if j > 0 and cost[i, j - 1] < best:
                best, best_len = cost[i, j - 1], length[i, j - 1]
            cost[i, j], length[i, j] = best + d, best_len + 1.0
    return cost[n - 1, m - 1] / length[n - 1, m - 1]


@numba.njit(parallel=True, cache=True)
def _dtw_pairs(feats: np.ndarray, starts: np.ndarray, ends: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    out = np.empty(pairs.shape[0])
    for p in numba.prange(pairs.shape[0]):
        a, b = pairs[p, 0], pairs[p, 1]
        out[p] = _dtw(feats[starts[a]:ends[a]], feats[starts[b]:ends[b]])
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float64 for the kernel."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def dtw_pairs(feats: np.ndarray, starts: np.ndarray, ends: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """DTW distance of each (item, item) pair; ``feats`` rows already unit length."""
    if len(pairs) == 0:
        return np.zeros(0)
    return _dtw_pairs(np.ascontiguousarray(feats, dtype=np.float64), np.asarray(starts, np.int64),
                      np.asarray(ends, np.int64), np.ascontiguousarray(pairs, dtype=np.int64))


def dtw_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The same DTW in plain numpy and Python (slow; the numba kernel's reference)."""
    x, y = unit_rows(x), unit_rows(y)
    d = np.arccos(np.clip(x @ y.T, -1.0, 1.0)) / np.pi
    n, m = d.shape
    cost = np.full((n, m), np.inf)
    length = np.zeros((n, m))
    cost[0, 0], length[0, 0] = d[0, 0], 1
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                continue
            cands = []
            if i > 0 and j > 0:
                cands.append((cost[i - 1, j - 1], length[i - 1, j - 1]))
            if i > 0:
                cands.append((cost[i - 1, j], length[i - 1, j]))
            if j > 0:
                cands.append((cost[i, j - 1], length[i, j - 1]))
            best = cands[0]
            for c in cands[1:]:
                if c[0] < best[0]:
                    best = c
            cost[i, j], length[i, j] = best[0] + d[i, j], best[1] + 1
    return float(cost[-1, -1] / length[-1, -1])


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
            groups[(p, n, speakers[u], c)].append((int(offsets[u] + s0), int(offsets[u] + e2)))
    rng = np.random.default_rng(seed)
    contexts: dict[tuple[int, int], int] = {}
    rows = []
    for (p, n, s, c) in sorted(groups):
        spans = groups[(p, n, s, c)]
        if len(spans) > max_per_group:
            spans = [spans[i] for i in np.sort(rng.choice(len(spans), max_per_group, replace=False))]
        ctx = contexts.setdefault((p, n), len(contexts))
        rows += [(a, b, c, ctx, s) for a, b in spans]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return Items(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4])


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
    # across keys (ctx, s1, s2, a, b): contexts, then speaker pairs, then phone pairs
    x = _hier_mean(across, [[0], [1, 2]])
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
