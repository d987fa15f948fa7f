"""The Fbank front end: Kaldi's filterbank, the conv encoder's 50 Hz frame grid, padding
independence, and the model and export around it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from pretrain.config import ConfigError
from pretrain.config.model import ModelConfig
from pretrain.frames import MFCC_HOP, MFCC_WINDOW, conv_num_frames, frame_centers, mfcc_num_frames
from pretrain.kaldi import EPS, FFT_SIZE, PREEMPHASIS, WINDOW, mel_banks
from pretrain.model.checkpoint import load_model, save_model
from pretrain.model.fbank import FbankFrontEnd
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.utils import PretrainError

TINY = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
            conv_pos=16, conv_pos_groups=4, final_dim=32, encoder_layerdrop=0.0)


def speech(tiny_corpus, count: int) -> list[np.ndarray]:
    out = []
    for line in (tiny_corpus / "utterances.jsonl").read_text().splitlines()[:count]:
        x, sr = sf.read(tiny_corpus / json.loads(line)["audio"], dtype="float32")
        assert sr == 16000
        out.append(x)
    return out


def reference_fbank(waveform: np.ndarray, bins: int, context: int, norm: str) -> np.ndarray:
    """One utterance's front-end features in numpy, a loop over frames written from the
    definition in ``pretrain.model.fbank``'s docstring."""
    x = np.asarray(waveform, dtype=np.float64)
    m = mfcc_num_frames(len(x))
    t = conv_num_frames(len(x))
    if t == 0:
        return np.zeros((0, bins * (2 * context + 1)), dtype=np.float32)
    idx = np.arange(MFCC_WINDOW)[None, :] + MFCC_HOP * np.arange(m)[:, None]
    f = x[idx]
    f = f - f.mean(1, keepdims=True)
    f = np.concatenate([f[:, :1] * (1 - PREEMPHASIS), f[:, 1:] - PREEMPHASIS * f[:, :-1]], axis=1)
    power = np.abs(np.fft.rfft(f * WINDOW, n=FFT_SIZE, axis=1)) ** 2
    logmel = np.log(np.maximum(power @ mel_banks(bins).T, EPS))
    rows = [np.concatenate([logmel[min(max(2 * i + o, 0), m - 1)] for o in range(-context, context + 1)])
            for i in range(t)]
    feats = np.stack(rows)
    if norm == "utterance":
        feats = (feats - feats.mean(0)) / np.sqrt(feats.var(0) + 1e-5)
    return feats.astype(np.float32)


def test_log_mel_matches_kaldi_native_fbank_on_real_speech(tiny_corpus):
    knf = pytest.importorskip("kaldi_native_fbank")
    front = FbankFrontEnd(80, 0, "none")
    for x in speech(tiny_corpus, 4):
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.mel_opts.num_bins = 80
        online = knf.OnlineFbank(opts)
        online.accept_waveform(16000, x.tolist())
        online.input_finished()
        ref = np.array([online.get_frame(i) for i in range(online.num_frames_ready)])
        ours = front.log_mel(torch.from_numpy(x)[None])[0].numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.parametrize("n", [0, 399, 400, 401, 719, 720, 1999, 16000, 16123])
def test_frames_are_the_conv_encoders(n):
    front = FbankFrontEnd(40, 1, "utterance")
    x = torch.randn(1, n) * 0.1
    assert front(x, torch.tensor([n])).shape == (1, conv_num_frames(n), 120)


def test_each_frame_sees_only_its_window_around_the_conv_frame_centre():
    # 50 Hz frame i stacks the 25 ms windows centred on 320 i + 200 and 10 ms either side, so it
    # reads samples [320 i - 160, 320 i + 560) and nothing else; the conv frame's centre is
    # 320 i + 200 (pretrain.frames), the same.
    n = 16000
    front = FbankFrontEnd(40, 1, "none")
    x = torch.randn(1, n) * 0.1
    base = front(x, torch.tensor([n]))[0]
    centres = frame_centers(n, 50)
    i = 20
    assert centres[i] == 320 * i + 200
    for lo, hi, inside in ((320 * i - 160, 320 * i + 560, True), (0, 320 * i - 160, False),
                           (320 * i + 560, n, False)):
        y = x.clone()
        y[0, lo:hi] += torch.randn(hi - lo) * 0.1
        changed = (front(y, torch.tensor([n]))[0, i] - base[i]).abs().max() > 1e-3
        assert bool(changed) == inside, (lo, hi)


def test_a_batch_gives_each_utterance_its_own_features(tiny_corpus):
    front = FbankFrontEnd(80, 1, "utterance")
    waves = speech(tiny_corpus, 3) + [np.random.default_rng(0).standard_normal(450).astype(np.float32) * 0.1]
    audio = torch.zeros(len(waves), max(map(len, waves)))
    for row, w in enumerate(waves):
        audio[row, :len(w)] = torch.from_numpy(w)
    batch = front(audio, torch.tensor([len(w) for w in waves]))
    for row, w in enumerate(waves):
        t = conv_num_frames(len(w))
        np.testing.assert_allclose(batch[row, :t].numpy(), reference_fbank(w, 80, 1, "utterance"),
                                   atol=2e-3, rtol=1e-4)
        assert not batch[row, t:].any()  # padding frames are zero
        single = front(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0]
        assert (single - batch[row, :t]).abs().max() < 1e-4


def test_fbank_model_trains_and_reports_every_layer(tiny_corpus):
    cfg = ModelConfig(frontend="fbank", fbank_bins=40, **TINY)
    model = HubertPretrain(cfg, [LabelSpec("km", 20, 50)])
    assert not any("feature_extractor" in name for name, _ in model.named_parameters())
    waves = speech(tiny_corpus, 2)
    audio = torch.zeros(2, max(map(len, waves)))
    for row, w in enumerate(waves):
        audio[row, :len(w)] = torch.from_numpy(w)
    lengths = torch.tensor([len(w) for w in waves])
    frames = conv_num_frames(audio.shape[1])
    targets = {"km": torch.randint(0, 20, (2, frames))}
    out = model(audio, lengths, targets, rng=np.random.default_rng(0))
    assert out["feature_pen"] == 0  # a fixed front end has nothing to penalize
    out["loss_sum"].backward()
    assert model.backbone.feature_projection.projection.weight.grad.abs().sum() > 0
    model.eval()
    states, padding = model.backbone.all_hidden_states(audio, lengths)
    assert len(states) == 2 and states[0].shape == (2, frames, 64)
    for layer in (1, 2):
        one, _ = model.backbone.hidden_states(audio, lengths, layer=layer)
        assert torch.equal(one, states[layer - 1])


def test_fbank_models_round_trip_and_refuse_hf_export(tmp_path):
    cfg = ModelConfig(frontend="fbank", **TINY)
    model = HubertPretrain(cfg, [LabelSpec("km", 20, 50)])
    save_model(tmp_path / "model.pt", model)
    loaded = load_model(tmp_path / "model.pt").eval()
    x = torch.randn(1, 8000) * 0.1
    assert torch.equal(loaded.backbone.hidden_states(x, torch.tensor([8000]))[0],
                       model.eval().backbone.hidden_states(x, torch.tensor([8000]))[0])
    from pretrain.model.export import export_hf

    with pytest.raises(PretrainError, match="model.frontend is 'fbank'"):
        export_hf(tmp_path / "model.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("field, value", [("frontend", "mel"), ("fbank_bins", 300), ("fbank_context", -1),
                                          ("fbank_norm", "global")])
def test_front_end_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value}).validate()


def test_small_cpu_recipe_config_loads_and_builds_an_fbank_model():
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.config.train import TrainConfig

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(TrainConfig, [repo / "configs/small_cpu.yaml"],
                      ["run_dir=/tmp/unused", "data.shards=/tmp/unused", "data.labels=[it1_km100]"])
    assert cfg.model.frontend == "fbank" and cfg.optim.decay == "linear" and cfg.optim.end_lr == 0.0
    model = HubertPretrain(cfg.model, [LabelSpec("it1_km100", 100, 100)])
    assert cfg.model.encoder_layers == 3 and cfg.model.pred_nomask_weight == 1.0
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 2.7e6  # the size the README's budget was measured with
