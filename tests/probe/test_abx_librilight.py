"""Our ABX against Libri-light's own ``eval_ABX`` (as ZeroSpeech packages it on PyPI,
``zerospeech-libriabx``), on the same features and the same ``.item`` file.

The reference runs in a subprocess from its own folder (``scripts/setup.sh`` installs it into
``.venv/libriabx``, built from source, without dependencies), so nothing of it can leak into
the package under test. Its ``eval_ABX`` imports torchaudio at the top for its CPC feature
maker; torchaudio has no build for our torch and the cross-check never calls that code, so the
subprocess registers an empty module under that name before importing it. Its across-speaker
iterator announces fewer triplet groups than it yields, which progressbar2 (the bar it asks
for) treats as an error; the subprocess lets the bar grow instead. Neither touches a score.

Both run without subsampling (groups and X speakers under every cap), where the two
definitions coincide; the reference works in float32, we in float64, hence the 0.1-point band
the issue asks for (measured: within 1e-5 points).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.probe.abx import abx_errors, read_item_file
from pretrain.probe.data import load_eval_set, segments
from pretrain.probe.features import mfcc_row, offsets_of

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(os.environ.get("PRETRAIN_LIBRIABX", REPO / ".venv" / "libriabx"))
NO_CAP = 10 ** 6

RUN_REFERENCE = """
import json, sys, types
sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
import progressbar
class Bar(progressbar.ProgressBar):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, max_error=False, **kwargs)
progressbar.ProgressBar = Bar
from libriabx.libri_light import eval_ABX as E
features, item = sys.argv[1], sys.argv[2]
scores = E.ABX(E.load_npy, item, E.find_all_files(features, ".npy"), "cosine", 1 / 0.02, ["within", "across"],
               cuda=False, max_x_across=int(sys.argv[3]), max_size_group=int(sys.argv[3]))
print("SCORES " + json.dumps(scores))
"""


@pytest.fixture(scope="module")
def reference() -> Path:
    if not (REFERENCE / "libriabx" / "libri_light" / "eval_ABX.py").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Libri-light ABX cross-check: {REFERENCE} is missing (scripts/setup.sh)")
        pytest.skip(f"Libri-light's eval_ABX is not installed in {REFERENCE} (scripts/setup.sh installs it)")
    return REFERENCE


def write_item_file(path: Path, es, ids: list[str]) -> int:
    """Every non-silence triphone of the evaluation set as a Libri-light item, with times that
    put its onset and offset inside frames (as forced alignments do), not on their edges."""
    lines = ["#file onset offset #phone prev-phone next-phone speaker"]
    for u, file_id in zip(es.utterances, ids):
        segs = segments(u.phones)
        for (p, s0, _), (c, _, _), (n, _, e2) in zip(segs, segs[1:], segs[2:]):
            if es.silence in (p, c, n):
                continue
            names = [es.phone_names[i] for i in (c, p, n)]
            lines.append(f"{file_id} {s0 * 0.02 + 0.004:.4f} {e2 * 0.02 + 0.013:.4f} {' '.join(names)} {u.speaker}")
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def reference_scores(reference: Path, feats: np.ndarray, offsets: np.ndarray, ids: list[str], item: Path,
                     work: Path) -> dict:
    folder = work / "features"
    folder.mkdir(parents=True)
    for u, file_id in enumerate(ids):
        np.save(folder / f"{file_id}.npy", feats[offsets[u]:offsets[u + 1]].astype(np.float32))
    env = {**os.environ, "PYTHONPATH": str(reference)}
    done = subprocess.run([sys.executable, "-c", RUN_REFERENCE, str(folder), str(item), str(NO_CAP)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SCORES "))
    return {k: 100 * v for k, v in json.loads(line[len("SCORES "):]).items()}


@pytest.mark.slow
def test_our_abx_equals_libri_light_eval_abx_on_the_same_features_and_item_file(reference, small_shards, tmp_path):
    es = load_eval_set(small_shards)
    waves = [u.audio for u in es.utterances]
    offsets = offsets_of(waves)
    keys = [u.key for u in es.utterances]
    # Libri-light names files by their stem; our keys are "<voice>/<voice>_<n>".
    ids = [k.rsplit("/", 1)[-1] for k in keys]
    item = tmp_path / "eval.item"
    n_items = write_item_file(item, es, ids)
    items, stats = read_item_file(item, keys, offsets, max_per_group=NO_CAP, seed=0)
    assert stats["lines"] == n_items and stats["unmatched"] == 0 and len(items) == n_items - stats["empty"]

    mfcc = mfcc_row(waves).layers[0]
    # MFCC with every 7th frame zeroed: the rule for zero frames (at 1 from every other frame,
    # 0 from another zero one) decides many distances here.
    holes = mfcc.copy()
    holes[::7] = 0
    # Features quantized to a few levels tie often, which exercises the DTW's tie rule.
    coarse = np.round(mfcc[:, :3] / 8)
    for name, feats in (("mfcc", mfcc), ("mfcc_with_zero_frames", holes), ("coarse", coarse)):
        ours = abx_errors(feats, items)
        theirs = reference_scores(reference, feats, offsets, ids, item, tmp_path / name)
        assert ours["abx_triplets_within"] >= 50 and ours["abx_triplets_across"] >= 500, ours
        print(name, {k: round(v, 4) for k, v in ours.items() if k in ("abx_within", "abx_across")}, theirs)
        assert abs(ours["abx_within"] - theirs["within"]) < 0.1, (name, ours, theirs)
        assert abs(ours["abx_across"] - theirs["across"]) < 0.1, (name, ours, theirs)
