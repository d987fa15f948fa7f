"""A training smoke test on real recorded speech: WavLM, its utterance mixing drawing partners
from real recordings, MFCC k-means targets of those recordings, two DeepSpeed processes; the
final checkpoint logged to wandb as an artifact."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest

from tests.train.test_train import launch

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_wavlm_trains_on_real_recordings_mixed_with_real_speech(recorded_shards, tmp_path):
    run = tmp_path / "wavlm"
    launch(run, recorded_shards, "data.labels=[km32]", "optim.max_steps=8", "optim.lr=0.002",
           "data.mixing.prob=0.5", "data.mixing.noise_prob=0.0", f"valid_shards={recorded_shards}",
           "valid_every=8", "valid_batches=2", "log.wandb_artifacts=true",
           configs=("configs/model/wavlm_tiny.yaml", "configs/train/wavlm_mixing.yaml"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])
    mixed = sum(r["mixed_speech_frac"] for r in train) / len(train)
    assert 0.2 < mixed < 0.8 and not any(r["mixed_noise_frac"] for r in train), mixed
    assert any(np.isfinite(r.get("valid_loss", np.nan)) for r in records)
    # The final checkpoint's model file, manifest and config went to wandb as one artifact.
    from tests.train.wandb_records import records

    final = run / "checkpoints/step_8"
    artifacts = [r.artifact for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")) for r in records(path)
                 if r.WhichOneof("record_type") == "artifact"]
    assert len(artifacts) == 1, artifacts
    artifact = artifacts[0]
    run_id = (run / "wandb_id").read_text().strip()
    assert (artifact.name, artifact.type, sorted(artifact.aliases)) == (f"model-{run_id}", "model", ["latest", "step_8"])
    manifest = json.loads((final / "manifest.json").read_text())
    assert json.loads(artifact.metadata)["model_sha256"] == manifest["files"]["model.pt"]
    files = {e.path: e.digest for e in artifact.manifest.contents}
    assert set(files) == {"model.pt", "manifest.json", "config.yaml"}
    md5 = base64.b64encode(hashlib.md5((final / "model.pt").read_bytes()).digest()).decode()
    assert files["model.pt"] == md5  # the bytes on disk
