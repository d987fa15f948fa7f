"""A training smoke test on real recorded speech: WavLM, its utterance mixing drawing partners
from real recordings, MFCC k-means targets of those recordings, two DeepSpeed processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.train.test_train import launch

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_wavlm_trains_on_real_recordings_mixed_with_real_speech(recorded_shards, tmp_path):
    run = tmp_path / "wavlm"
    launch(run, recorded_shards, "data.labels=[km32]", "optim.max_steps=8", "optim.lr=0.002",
           "data.mixing.prob=0.5", "data.mixing.noise_prob=0.0", f"valid_shards={recorded_shards}",
           "valid_every=8", "valid_batches=2",
           configs=("configs/model/wavlm_tiny.yaml", "configs/train/wavlm_mixing.yaml"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])
    mixed = sum(r["mixed_speech_frac"] for r in train) / len(train)
    assert 0.2 < mixed < 0.8 and not any(r["mixed_noise_frac"] for r in train), mixed
    assert any(np.isfinite(r.get("valid_loss", np.nan)) for r in records)
    assert (run / "checkpoints/step_8/model.pt").is_file()
