"""data2vec on the HuBERT backbone: targets, loss and the EMA rule against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.frames import conv_num_frames
from pretrain.model.data2vec import Data2VecPretrain, EmaTeacher, ema_decay, spread
from tests.model.test_model import model_config


def tiny(*overrides: str):
    torch.manual_seed(0)
    cfg = model_config("tiny", "model.objective=data2vec", "model.data2vec.top_k_layers=2", *overrides)
    return cfg, Data2VecPretrain(cfg)


def hand_targets(model: Data2VecPretrain, teacher: EmaTeacher, x: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher's layers written out (post-LN): feed-forward outputs before the last residual,
    instance-normalized over time (F.instance_norm: no padding here), top k averaged."""
    enc = model.backbone.encoder
    h = enc.layer_norm(x + enc.pos_conv_embed(x))
    outs = []
    for layer in teacher.layers:
        a = layer.layer_norm(h + layer.attention(h, None, None))
        ffn = layer.feed_forward.output_dense(F.gelu(layer.feed_forward.intermediate_dense(a)))
        h = layer.final_layer_norm(a + ffn)
        outs.append(F.instance_norm(ffn.transpose(1, 2), eps=1e-5).transpose(1, 2))
    return sum(outs[-k:]) / k


def test_targets_and_loss_match_a_hand_computation():
    cfg, model = tiny()
    model.eval()  # no dropout, so that the loss can be recomputed by hand
    teacher = EmaTeacher(model)
    # The teacher starts as the student; move it away so that a mix-up would show.
    teacher.update(Data2VecPretrain(cfg), 0.5)
    audio, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 16000])
    frames = conv_num_frames(16000)
    with torch.no_grad():
        feats = model.backbone.features(audio, lengths)
        x = model.backbone.feature_projection.projection(model.backbone.feature_projection.layer_norm(feats))
        expected = hand_targets(model, teacher, x, 2)
        got = teacher.targets(model, x, torch.zeros(2, frames, dtype=torch.bool))
    assert torch.allclose(got, expected, atol=1e-5)
    # The loss: squared error summed over channels, over masked frames, times 1/sqrt(dim).
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[:, 5:15] = True
    out = model(audio, lengths, {}, mask=mask, teacher=teacher)
    with torch.no_grad():
        x_masked = torch.where(mask[..., None], model.backbone.masked_spec_embed, x)
        pred = model.final_proj(model.backbone.encoder(x_masked, torch.zeros(2, frames, dtype=torch.bool))[mask])
        loss = ((pred - expected[mask]) ** 2).sum() / cfg.encoder_embed_dim ** 0.5
    assert out["num_masked"] == out["sample_size"] == 20
    assert torch.allclose(out["loss_sum"], loss, rtol=1e-5)
    out["loss_sum"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained
    assert model.final_proj.weight.grad is not None


def test_targets_use_only_an_utterances_own_frames():
    # A short utterance padded in a batch gets the targets it gets alone: attention, the
    # positional convolution and the normalization statistics all leave the padding out. (From
    # the encoder input on: HuBERT BASE's group-norm front end itself sees the padding.)
    cfg, model = tiny()
    teacher = EmaTeacher(model)
    dim, n = cfg.encoder_embed_dim, 37
    x = torch.randn(2, 60, dim)
    padding = torch.zeros(2, 60, dtype=torch.bool)
    padding[1, n:] = True
    with torch.no_grad():
        both = teacher.targets(model.eval(), x, padding)
        alone = teacher.targets(model, x[1:, :n], torch.zeros(1, n, dtype=torch.bool))
    assert torch.allclose(both[1, :n], alone[0], atol=1e-4)
    assert both[1, n:].abs().max() == 0


def test_the_ema_rule_and_its_schedule():
    cfg, student = tiny("model.data2vec.ema_decay=0.9", "model.data2vec.ema_end_decay=0.99",
                        "model.data2vec.ema_anneal_steps=10")
    assert ema_decay(cfg, 0) == pytest.approx(0.9) and ema_decay(cfg, 5) == pytest.approx(0.945)
    assert ema_decay(cfg, 10) == ema_decay(cfg, 1000) == pytest.approx(0.99)
    teacher = EmaTeacher(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, ema_decay(cfg, 5))
    theirs = dict(student.backbone.encoder.layers.named_parameters())
    for name, value in teacher.layers.named_parameters():
        assert torch.allclose(value, 0.945 * before[f"layers.{name}"] + 0.055 * theirs[name], atol=1e-6), name
    assert teacher.layers[0].attention.q_proj.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.parameters())


def test_spread_is_the_mean_per_channel_standard_deviation():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(500, 8)) * np.arange(1, 9))
    moments = torch.stack([x.sum(0), (x ** 2).sum(0)])
    assert spread(moments, 500) == pytest.approx(float(torch.sqrt(x.var(0) + 1e-6).mean()), rel=1e-9)


def test_the_model_file_keeps_the_teacher(tmp_path):
    from pretrain.model.checkpoint import load_model, load_teacher_state, save_model

    cfg, model = tiny()
    teacher = EmaTeacher(model)
    teacher.update(Data2VecPretrain(cfg), 0.5)
    save_model(tmp_path / "model.pt", model, teacher=teacher.state_dict())
    loaded = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, Data2VecPretrain) and loaded.labels == []
    state = load_teacher_state(tmp_path)
    assert state.keys() == teacher.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())


def test_train_configs_refuse_what_data2vec_cannot_do():
    from pretrain.config import ConfigError, load_config
    from pretrain.config.train import TrainConfig

    base = ["run_dir=x", "data.shards=y", "model.objective=data2vec"]
    load_config(TrainConfig, [], [*base, "data.labels=[]"])
    for extra, field in ((["data.labels=[km100]"], "data.labels"),
                         (["data.labels=[]", "deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
                         (["data.labels=[]", "valid_shards=z"], "valid_shards"),
                         (["data.labels=[]", "model.data2vec.top_k_layers=13"], "top_k_layers")):
        with pytest.raises(ConfigError, match=field):
            load_config(TrainConfig, [], [*base, *extra])



def test_the_positional_stack_by_hand_and_why_it_goes_one_utterance_at_a_time():
    """data2vec's positional embedding (conv_pos_depth) written out, and its known trait: the
    padding's values after the first convolution reach an utterance's last frames in a batch,
    so feature dumping and the probes take such models one utterance per forward."""
    from pretrain.model.encoder import batch_invariant

    cfg, model = tiny("model.extractor_mode=layer_norm", "model.conv_pos=5", "model.conv_pos_depth=3")
    model.eval()
    stack = model.backbone.encoder.pos_conv_embed
    x = torch.randn(1, 30, cfg.encoder_embed_dim)
    h = x.transpose(1, 2)
    for layer in stack.layers:
        y = F.conv1d(h, layer.conv.weight, layer.conv.bias, padding=2, groups=cfg.conv_pos_groups)
        h = F.gelu(F.layer_norm(y.transpose(1, 2), (cfg.encoder_embed_dim,)).transpose(1, 2))
    assert torch.allclose(stack(x), h.transpose(1, 2), atol=1e-6)

    # Frames 20+ of the second utterance are padding (zeroed, as the encoder does): the stack
    # leaks them into the last frames before it (receptive field 3 x 2 frames each side).
    padded = x.repeat(2, 1, 1)
    padded[1, 20:] = 0.0
    with torch.no_grad():
        batched, alone = stack(padded)[1, :20], stack(padded[1:, :20])[0]
    assert torch.allclose(batched[:14], alone[:14], atol=1e-6)
    assert (batched[14:] - alone[14:]).abs().max() > 1e-2
    # ... and attention spreads it over the whole utterance.
    wave = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        together, _ = model.backbone.hidden_states(wave, torch.tensor([16000, 12000]), layer=1)
        single, _ = model.backbone.hidden_states(wave[1:, :12000], torch.tensor([12000]), layer=1)
    assert (together[1, : single.shape[1]] - single[0]).abs().max() > 1e-4
    assert not batch_invariant(cfg)
    assert batch_invariant(model_config("tiny", "model.extractor_mode=layer_norm"))
