"""wav2vec 2.0 on the HuBERT backbone: distractors, quantizer and losses, against transformers'
Wav2Vec2ForPreTraining given the same mask, distractors and Gumbel noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.frames import conv_num_frames
from pretrain.model.wav2vec2 import Wav2Vec2Pretrain, gumbel_noise, gumbel_temperature, sample_negatives
from tests.model.test_model import REPO, model_config

SMALL = ["model.objective=wav2vec2", "model.wav2vec2.num_vars=16", "model.wav2vec2.codevector_dim=32",
         "model.wav2vec2.num_negatives=10", "model.final_dim=24"]


def tiny(*overrides: str):
    torch.manual_seed(0)
    cfg = model_config("tiny", *SMALL, *overrides)
    return cfg, Wav2Vec2Pretrain(cfg)


def test_distractors_are_other_masked_frames_of_the_same_utterance_uniformly():
    counts = [1, 0, 5, 40]
    neg = sample_negatives(counts, 2000, torch.Generator().manual_seed(0))
    assert neg.shape == (46, 2000)
    assert (neg[0] == 0).all()  # alone in its utterance: itself, which the loss never counts
    starts = np.cumsum([0] + counts)
    for u, n in enumerate(counts):
        for i in range(starts[u], starts[u] + n if n > 1 else starts[u]):
            row = neg[i]
            assert ((row >= starts[u]) & (row < starts[u] + n)).all() and not (row == i).any()
            if n == 40:  # uniform over the 39 others
                hist = np.bincount(row.numpy() - starts[u], minlength=40)
                assert hist[i - starts[u]] == 0 and hist.sum() == 2000
                others = np.delete(hist, i - starts[u])
                assert others.min() > 20 and others.max() < 85, others
    # the same generator state gives the same draws
    again = sample_negatives(counts, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(neg, again)


def test_temperature_schedule():
    cfg, _ = tiny()
    assert gumbel_temperature(cfg, 0) == 2.0
    assert gumbel_temperature(cfg, 1000) == pytest.approx(2.0 * 0.999995 ** 1000)
    assert gumbel_temperature(cfg, 10**7) == 0.5


def test_loss_matches_a_hand_computation_and_the_hard_codes_are_one_hot():
    cfg, model = tiny("model.dropout=0", "model.dropout_input=0", "model.dropout_features=0",
                      "model.attention_dropout=0", "model.feature_pen_weight=0")
    model.train()
    audio, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    frames = conv_num_frames(16000)
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[0, 3:20] = True
    mask[1, 10:22] = True
    gen = torch.Generator().manual_seed(3)
    out = model(audio, lengths, None, mask=mask, generator=gen, temperature=1.5)
    n = int(mask.sum())
    assert out["num_masked"] == out["sample_size"] == n == 29
    # Recompute from the same draws: the generator draws the distractors, then the noise.
    gen = torch.Generator().manual_seed(3)
    neg = sample_negatives([17, 12], 10, gen)
    g = -torch.log(-torch.log(torch.rand((n, 2, 16), generator=gen, dtype=torch.float64))).float()
    with torch.no_grad():
        b = model.backbone
        feats = b.features(audio, lengths)
        normed = b.feature_projection.layer_norm(feats)
        x = torch.where(mask[..., None], b.masked_spec_embed, b.feature_projection.projection(normed))
        from pretrain.model.hubert import frame_padding_mask

        x = b.encoder(x, frame_padding_mask(lengths, frames))
        logits_q = model.quantizer.weight_proj(normed[mask]).view(n, 2, 16)
        choice = (logits_q + g).argmax(-1)  # the temperature does not change the hard choice
        codes = torch.cat([model.quantizer.codevectors[0, gi * 16 + choice[:, gi]] for gi in range(2)], dim=-1)
        y = model.project_q(codes)
        c = model.project_hid(x[mask])
        cand = torch.cat([y[:, None], y[neg]], 1)
        logits = F.cosine_similarity(c[:, None], cand, dim=-1) / 0.1
        same = (choice[neg] == choice[:, None]).all(-1)  # a distractor with the target's code
        assert same.any()  # 2 x 16 entries for 29 frames: it happens here, so the rule is tested
        logits[:, 1:][same] = float("-inf")
        contrastive = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long), reduction="sum")
        avg = torch.softmax(logits_q, -1).mean(0)
        ppl = torch.exp(-(avg * torch.log(avg + 1e-7)).sum(-1)).sum()
        diversity = (32 - ppl) / 32 * n
    assert torch.allclose(out["contrastive_sum"], contrastive, rtol=1e-5)
    assert torch.allclose(out["diversity_sum"], diversity, rtol=1e-5)
    assert torch.allclose(out["loss_sum"], contrastive + 0.1 * diversity, rtol=1e-5)
    assert out["code_hard"].sum() == 2 * n and out["code_soft"].sum() == pytest.approx(2 * n)
    out["loss_sum"].backward()
    # The straight-through estimator reaches the codebook logits and the front end.
    assert model.quantizer.weight_proj.weight.grad.abs().sum() > 0
    assert model.backbone.feature_extractor.conv_layers[0].conv.weight.grad.abs().sum() > 0


def test_a_distractor_with_the_targets_code_is_never_counted():
    cfg, model = tiny("model.dropout=0", "model.dropout_input=0", "model.dropout_features=0",
                      "model.attention_dropout=0")
    model.eval()
    audio, lengths = torch.randn(1, 16000) * 0.1, torch.tensor([16000])
    mask = torch.zeros(1, conv_num_frames(16000), dtype=torch.bool)
    mask[0, :30] = True
    # Every distractor is the frame itself: counted, each frame would lose log(11); left out,
    # the target is alone and certain.
    itself = torch.arange(30)[:, None].repeat(1, 10)
    out = model(audio, lengths, None, mask=mask, negatives=itself)
    assert float(out["contrastive_sum"]) == 0.0 and out["correct"] == 30
    other = torch.roll(torch.arange(30), 1)[:, None].repeat(1, 10)
    assert float(model(audio, lengths, None, mask=mask, negatives=other)["contrastive_sum"]) > 0


@pytest.fixture
def hf_pair():
    """Our model and transformers' Wav2Vec2ForPreTraining holding the same weights (no dropout)."""
    import transformers

    from pretrain.model.export import hf_config, hf_pretraining_state

    cfg, model = tiny("model.dropout=0", "model.dropout_input=0", "model.dropout_features=0",
                      "model.attention_dropout=0", "model.encoder_layerdrop=0", "model.feature_pen_weight=0")
    hf = transformers.Wav2Vec2ForPreTraining(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(hf_pretraining_state(model), strict=False)
    assert not missing and not unexpected
    return cfg, model, hf


def test_losses_equal_transformers_given_the_same_mask_distractors_and_noise(hf_pair, monkeypatch):
    cfg, model, hf = hf_pair
    model.train()
    hf.train()
    audio, lengths = torch.randn(2, 20000) * 0.1, torch.tensor([20000, 20000])
    frames = conv_num_frames(20000)
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[0, 2:25] = True
    mask[1, 30:52] = True
    counts = mask.sum(1).tolist()
    gen = torch.Generator().manual_seed(7)
    neg = sample_negatives(counts, 10, gen)
    # transformers' distractor indices: (B, T, K) into the flattened (B * T) frames.
    flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
    sampled = torch.zeros(2, frames, 10, dtype=torch.long)
    sampled.view(-1, 10)[flat] = flat[neg]
    noise = gumbel_noise((2 * frames * 2, 16), gen)

    def gumbel_softmax_with_our_noise(logits, tau=1.0, hard=False, dim=-1):
        soft = torch.softmax((logits + noise) / tau, dim=dim)
        return F.one_hot(soft.argmax(dim), soft.shape[dim]).to(soft.dtype) - soft.detach() + soft

    temperature = gumbel_temperature(cfg, 12345)
    hf.set_gumbel_temperature(temperature)
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", gumbel_softmax_with_our_noise)
    theirs = hf(audio, mask_time_indices=mask, sampled_negative_indices=sampled)
    ours = model(audio, lengths, None, mask=mask, negatives=neg, temperature=temperature,
                 gumbel=noise.view(2, frames, 2, 16)[mask])
    assert abs(float(ours["contrastive_sum"]) - float(theirs.contrastive_loss)) < 1e-4 * float(theirs.contrastive_loss)
    assert abs(float(ours["diversity_sum"]) - float(theirs.diversity_loss)) < 1e-4 * max(1.0, float(theirs.diversity_loss))
    assert abs(float(ours["loss_sum"]) - float(theirs.loss)) < 1e-4 * float(theirs.loss)
    # and the gradients agree too (the straight-through path included)
    ours["loss_sum"].backward()
    theirs.loss.backward()
    for name in ("quantizer.weight_proj.weight", "quantizer.codevectors", "project_q.weight", "project_hid.weight"):
        mine, other = dict(model.named_parameters())[name].grad, dict(hf.named_parameters())[name].grad
        assert torch.allclose(mine, other, atol=1e-4 * float(other.abs().max()) + 1e-7), name


def test_every_layer_equals_transformers_wav2vec2model(hf_pair):
    import transformers

    cfg, model, hf = hf_pair
    model.eval()
    backbone = transformers.Wav2Vec2Model(hf.config)
    backbone.load_state_dict(hf.wav2vec2.state_dict())
    backbone.eval()
    wave = torch.randn(1, 24000) * 0.1
    with torch.no_grad():
        states, _ = model.backbone.all_hidden_states(wave, torch.tensor([24000]))
        theirs = backbone(wave, output_hidden_states=True).hidden_states
    assert len(states) == cfg.encoder_layers
    for layer, mine in enumerate(states, start=1):
        assert (mine - theirs[layer]).abs().max() < 1e-4, layer


def test_export_import_and_probe_through_transformers(tmp_path, tiny_corpus):
    """``export hf`` writes a Wav2Vec2ForPreTraining (heads included) that Wav2Vec2Model loads
    with the same layers; ``import hf`` brings it back whole; ``probe`` reads the folder."""
    import json

    import transformers

    from pretrain.cli import main
    from pretrain.model.checkpoint import load_model, save_model

    cfg, model = tiny()
    save_model(tmp_path / "model.pt", model)
    assert main(["export", "hf", str(tmp_path / "model.pt"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["Wav2Vec2ForPreTraining"] and config["num_codevectors_per_group"] == 16
    assert "# wav2vec 2.0 pretrained with pretrain" in (tmp_path / "hf/README.md").read_text()
    pretraining = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf")
    assert torch.equal(pretraining.quantizer.codevectors, model.quantizer.codevectors)
    assert torch.equal(pretraining.project_hid.weight, model.project_hid.weight)
    backbone = transformers.Wav2Vec2Model.from_pretrained(tmp_path / "hf").eval()
    model.eval()
    wave = torch.randn(1, 20000) * 0.1
    with torch.no_grad():
        theirs = backbone(wave, output_hidden_states=True).hidden_states
        states, _ = model.backbone.all_hidden_states(wave, torch.tensor([20000]))
    assert all((states[i] - theirs[i + 1]).abs().max() < 1e-4 for i in range(cfg.encoder_layers))
    # Back: the whole model, heads included, the same weights.
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    back = load_model(tmp_path / "back.pt")
    assert back.cfg.objective == "wav2vec2" and back.cfg.wav2vec2.num_vars == 16 and back.cfg.final_dim == 24
    mine, again = model.state_dict(), back.state_dict()
    assert set(mine) == set(again) and all(torch.equal(mine[k], again[k]) for k in mine)
    # A Wav2Vec2Model folder (no heads) imports as a backbone.
    backbone.save_pretrained(tmp_path / "hf_backbone")
    assert main(["import", "hf", str(tmp_path / "hf_backbone"), str(tmp_path / "backbone.pt")]) == 0
    assert load_model(tmp_path / "backbone.pt").cfg.objective == "hubert"
    # The probe reads the transformers folder itself.
    from pretrain.model.states import LayerStates

    for folder in ("hf_backbone", "hf"):  # a Wav2Vec2Model, and the Wav2Vec2ForPreTraining's backbone
        source = LayerStates(tmp_path / folder)
        assert source.num_layers == cfg.encoder_layers and source.arch == "wav2vec2"


def test_the_shipped_base_config_is_transformers_default_wav2vec2():
    """configs/model/wav2vec2_base.yaml against transformers' default Wav2Vec2Config (the
    paper's BASE): the same network and heads, parameter for parameter."""
    import transformers

    from pretrain.model.export import hf_config

    from pretrain.config import load_config
    from pretrain.config.train import TrainConfig

    cfg = load_config(TrainConfig, [REPO / "configs/model/wav2vec2_base.yaml"], ["run_dir=r", "data.shards=s"]).model
    ours = Wav2Vec2Pretrain(cfg)
    theirs = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config())
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    from pretrain.model.export import hf_pretraining_state

    assert {k: tuple(v.shape) for k, v in hf_pretraining_state(ours).items()} == shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and 95e6 < count < 96e6, count
    default, mine = transformers.Wav2Vec2Config().to_dict(), hf_config(cfg).to_dict()
    for key in ("num_codevector_groups", "num_codevectors_per_group", "codevector_dim", "proj_codevector_dim",
                "contrastive_logits_temperature", "num_negatives", "diversity_loss_weight", "hidden_size",
                "num_hidden_layers", "intermediate_size", "feat_extract_norm", "do_stable_layer_norm",
                "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "conv_bias"):
        assert mine[key] == default[key], key
    # LayerDrop is fairseq's pretraining 0.05; transformers' default, 0.1, is its fine-tuning one.
    assert mine["layerdrop"] == 0.05
