"""Long utterances in windows: bounded memory, and the same features as the whole utterance
within a stated tolerance where both fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pretrain.data.shards import read_manifest
from pretrain.features.extract import Extractor, FeatureSpec, shard_utterances

from tests.features.test_sample import make_model_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode,normalize", [("group_norm", False), ("layer_norm", True)])
def test_windows_give_the_whole_utterance_features(small_shards, tmp_path, mode, normalize):
    """A 12 s utterance in 5 s windows with 3 s of context: BASE's GroupNorm (per channel over
    all of time) and the waveform normalization use the whole utterance's statistics, so only
    attention beyond the context differs (measured: at most 0.2 % of the largest value)."""
    waves = [w for e in read_manifest(small_shards)["shards"] for _, w in shard_utterances(small_shards / e["name"])]
    long = np.concatenate(waves)[:12 * 16000]
    model = make_model_file(tmp_path / "m.pt", f"model.extractor_mode={mode}",
                            f"model.normalize_waveform={str(normalize).lower()}")
    spec = FeatureSpec.model(str(model), 2, chunk_seconds=1000.0)
    whole = Extractor(spec, "cpu")([long])[0]
    windowed = Extractor(replace(spec, chunk_seconds=5.0, chunk_context=3.0), "cpu")([long])[0]
    assert windowed.shape == whole.shape
    assert np.abs(windowed - whole).max() < 0.005 * np.abs(whole).max()
    # Without the utterance's statistics (or without context) they would differ by far more:
    # the check above can fail.
    bare = Extractor(replace(spec, chunk_seconds=5.0, chunk_context=0.0), "cpu")([long])[0]
    assert np.abs(bare - whole).max() > 0.05 * np.abs(whole).max()
