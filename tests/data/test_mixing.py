"""WavLM utterance/noise mixing in the data workers: measured on the batches it yields."""

from __future__ import annotations


import numpy as np
import pytest

from pretrain.config import ConfigError, load_config
from pretrain.config.data import DataConfig
from pretrain.data.mixing import NOISE, SPEECH
from pretrain.utils import PretrainError

from tests.data.resume_child import signature
from tests.data.test_pipeline import data_cfg, interrupted, make_loader, run_children

pytestmark = pytest.mark.slow


def mixing(noise_shards, *overrides: str) -> list[str]:
    return [f"mixing.noise_shards={noise_shards}", "labels=[phones50]", *overrides]


def measured(clean: dict, mixed: dict, i: int) -> tuple[int, int, float]:
    """(segment start, segment length, energy ratio in dB) of row i, from the two batches."""
    n = int(clean["lengths"][i])
    x = clean["audio"][i, :n].double().numpy()
    diff = mixed["audio"][i, :n].double().numpy() - x
    nonzero = np.flatnonzero(np.abs(diff) > 0)
    start, length = int(nonzero[0]), int(nonzero[-1] - nonzero[0] + 1)
    p_primary = np.mean(x ** 2)
    p_segment = np.sum(diff ** 2) / length
    return start, length, float(10 * np.log10(p_primary / p_segment))


def test_mixed_segments_obey_the_configured_ranges_and_labels_stay(small_shards, noise_shards):
    # In worker processes: where training mixes (the resume test covers 0 workers too).
    base = data_cfg(small_shards, "num_workers=2", *mixing(noise_shards))
    clean = list(make_loader(base))
    loader = make_loader([*base, "mixing.prob=1.0"])
    mixed = list(loader)
    kinds = {SPEECH: [], NOISE: []}
    for c, m in zip(clean, mixed, strict=True):
        assert c["keys"] == m["keys"]
        assert np.array_equal(c["labels"]["phones50"], m["labels"]["phones50"])  # labels untouched
        assert not c["mixing"].any()
        for i, kind in enumerate(m["mixing"].tolist()):
            assert kind in (SPEECH, NOISE)
            start, length, ratio = measured(c, m, i)
            n = int(c["lengths"][i])
            assert 1 <= length <= n // 2 and start + length <= n
            low, high = (-5.0, 5.0) if kind == SPEECH else (-5.0, 20.0)
            # the span of non-zero differences can miss a zero sample at a segment's edge
            assert low - 0.05 <= ratio <= high + 0.05, (kind, ratio)
            kinds[kind].append(ratio)
    assert len(kinds[SPEECH]) >= 5 and len(kinds[NOISE]) >= 5
    assert max(kinds[NOISE]) > 5.0  # the noise range reaches beyond the speech range
    metrics = loader.metrics()
    assert metrics["mixed_speech"] == len(kinds[SPEECH]) and metrics["mixed_noise"] == len(kinds[NOISE])


def test_fixed_ratios_are_met_exactly_and_prob_is_a_fraction(small_shards, noise_shards):
    base = data_cfg(small_shards, "num_workers=0", *mixing(noise_shards))
    clean = list(make_loader(base))
    mixed = list(make_loader([*base, "mixing.prob=1.0", "mixing.speech_snr=[3.0,3.0]",
                              "mixing.noise_snr=[12.0,12.0]", "mixing.max_length_ratio=0.25"]))
    for c, m in zip(clean, mixed):
        for i, kind in enumerate(m["mixing"].tolist()):
            _, length, ratio = measured(c, m, i)
            assert length <= int(c["lengths"][i]) // 4
            assert abs(ratio - (3.0 if kind == SPEECH else 12.0)) < 0.05
    # prob=0.3: about 30 % of 40 utterances per epoch (2 epochs seen)
    loader = make_loader([*base, "mixing.prob=0.3"])
    rows = [k for _ in range(2) for b in loader for k in b["mixing"].tolist()]
    fraction = np.mean(np.array(rows) > 0)
    assert 0.12 < fraction < 0.5, fraction


def test_speech_only_mixing_and_a_pool_of_one(small_shards, noise_shards):
    speech_only = data_cfg(small_shards, "num_workers=0", "labels=[phones50]", "mixing.prob=1.0",
                           "mixing.noise_prob=0.0")
    batches = list(make_loader(speech_only))
    assert all((b["mixing"] == SPEECH).all() for b in batches)
    # A pool of one utterance has no partner: counted, not mixed.
    loader = make_loader([*speech_only, "bucket_size=1"])
    assert not any(b["mixing"].any() for b in loader)
    assert loader.metrics()["mix_no_partner"] == 40


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_mixes_identically(small_shards, noise_shards, tmp_path, workers):
    cfg = data_cfg(small_shards, f"num_workers={workers}", *mixing(noise_shards, "mixing.prob=0.5"))
    full = make_loader(cfg)
    epoch0, epoch1 = [signature(b) for b in full], [signature(b) for b in full]
    n = len(epoch0)
    runs = [interrupted(cfg, k) for k in (1, n // 2)]
    for (taken, _), rest in zip(runs, run_children(cfg, [(state, 2) for _, state in runs], tmp_path)):
        assert taken + rest == epoch0 + epoch1
    # and mixing really changed the audio (the signatures include it)
    clean = make_loader(data_cfg(small_shards, f"num_workers={workers}", "labels=[phones50]"))
    assert [signature(b) for b in clean] != epoch0


def test_resume_with_other_mixing_is_refused(small_shards, noise_shards):
    cfg = data_cfg(small_shards, "num_workers=0", *mixing(noise_shards, "mixing.prob=0.5"))
    state = make_loader(cfg).state_dict()
    for other in (["mixing.prob=0.2"], ["mixing.prob=0.0"], ["mixing.noise_snr=[0.0,10.0]"]):
        with pytest.raises(PretrainError, match="data.mixing"):
            make_loader([*cfg, *other]).load_state_dict(state)


def test_bad_mixing_settings_name_the_field(small_shards, tmp_path):
    with pytest.raises(ConfigError, match="mixing.noise_shards"):
        load_config(DataConfig, [], data_cfg(small_shards, "mixing.prob=0.2"))
    with pytest.raises(ConfigError, match="mixing.speech_snr"):
        load_config(DataConfig, [], data_cfg(small_shards, "mixing.speech_snr=[5.0,-5.0]"))
    with pytest.raises(ConfigError, match="mixing.max_length_ratio"):
        load_config(DataConfig, [], data_cfg(small_shards, "mixing.max_length_ratio=0.0"))
    with pytest.raises(PretrainError, match="data.mixing.noise_shards: .*nowhere"):
        make_loader(data_cfg(small_shards, "mixing.prob=0.2", f"mixing.noise_shards={tmp_path / 'nowhere'}"))
