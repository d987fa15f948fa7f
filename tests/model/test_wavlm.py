"""WavLM's gated relative position bias: buckets, gate formula, sizes."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config.core import ConfigError
from pretrain.model.encoder import Attention, relative_position_buckets
from pretrain.model.hubert import HubertPretrain, LabelSpec

from tests.model.test_model import count, model_config


# (relative position key - query, bucket) for num_buckets=320, max_distance=800, worked out by
# hand from T5's definition: 160 buckets per direction, 80 of them exact, positive offsets in
# the upper half, then floor(80 + log(d / 80) / log(800 / 80) * 80), capped at 159.
HAND_CASES = [(0, 0), (-1, 1), (1, 161), (-79, 79), (79, 239), (-80, 80), (80, 240),
              (-200, 111), (200, 271), (-799, 159), (-800, 159), (-5000, 159), (5000, 319),
              (-100, 87), (-400, 135)]


def test_buckets_match_hand_computed_t5_cases():
    rel = torch.tensor([r for r, _ in HAND_CASES])
    got = relative_position_buckets(rel, 320, 800).tolist()
    assert got == [b for _, b in HAND_CASES]
    for r, b in HAND_CASES:  # the formula itself, once more, in plain floats
        d = abs(r)
        expected = d if d < 80 else min(159, int(80 + math.log(d / 80) / math.log(10) * 80))
        assert b == expected + (160 if r > 0 else 0)


def test_buckets_equal_transformers_on_every_offset():
    transformers = pytest.importorskip("transformers")
    attn = transformers.models.wavlm.modeling_wavlm.WavLMAttention(64, 4, num_buckets=320, max_distance=800)
    rel = torch.arange(-3000, 3001)
    assert torch.equal(relative_position_buckets(rel, 320, 800), attn._relative_positions_bucket(rel))


def test_gated_bias_follows_the_formula():
    """softmax(q k / sqrt(d) + (g_u (a g_r - 1) + 2) d_{j-i}) v, written out by hand."""
    torch.manual_seed(0)
    heads, dim, t = 2, 8, 7
    attn = Attention(dim, heads, 0.0, gated=True, num_buckets=8, max_distance=20, has_bias_embedding=True)
    with torch.no_grad():
        attn.gru_rel_pos_const.copy_(torch.tensor([0.7, 1.6]).view(1, 2, 1, 1))
        attn.gru_rel_pos_linear.weight.normal_(0, 1.0)
        attn.rel_attn_embed.weight.normal_(0, 1.0)
    x = torch.randn(1, t, dim)
    d = attn.position_bias(t)  # (H, T, T)
    out = attn(x, None, d)

    hd = dim // heads
    expected = torch.zeros(1, t, dim)
    for h in range(heads):
        q = attn.q_proj(x)[0, :, h * hd:(h + 1) * hd]
        k = attn.k_proj(x)[0, :, h * hd:(h + 1) * hd]
        v = attn.v_proj(x)[0, :, h * hd:(h + 1) * hd]
        for i in range(t):
            proj = attn.gru_rel_pos_linear(x[0, i, h * hd:(h + 1) * hd])
            g_u = torch.sigmoid(proj[:4].sum())
            g_r = torch.sigmoid(proj[4:].sum())
            a = attn.gru_rel_pos_const[0, h, 0, 0]
            bias = (g_u * (g_r * a - 1) + 2) * d[h, i]
            weights = torch.softmax(q[i] @ k.T / math.sqrt(hd) + bias, dim=-1)
            expected[0, i, h * hd:(h + 1) * hd] = weights @ v
    assert torch.allclose(out, attn.out_proj(expected), atol=1e-5)
    # d depends only on j - i
    assert torch.equal(d[:, 1:, 1:], d[:, :-1, :-1])


def test_padding_is_never_attended_with_the_bias():
    # layer-norm front end: group norm would see the padding (see features.extract)
    torch.manual_seed(0)
    model = HubertPretrain(model_config("wavlm_tiny", "model.extractor_mode=layer_norm"),
                           [LabelSpec("km", 10, 50)]).eval()
    wave = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 9600])
    with torch.no_grad():
        both, _ = model.backbone.hidden_states(wave * (torch.arange(16000) < lengths[:, None]), lengths)
        alone, _ = model.backbone.hidden_states(wave[1:, :9600], lengths[1:])
    assert (both[1, :alone.shape[1]] - alone[0]).abs().max() < 1e-4


@pytest.mark.parametrize("size, published", [("wavlm_base", 94.70e6), ("wavlm_base_plus", 94.70e6),
                                             ("wavlm_large", 316.62e6)])
def test_parameter_counts_match_the_paper(size, published):
    with torch.device("meta"):  # shapes only: no memory, no initialization time
        model = HubertPretrain(model_config(size), [LabelSpec("km", 500, 50)])
        hubert = HubertPretrain(model_config(size.replace("wavlm_", "").replace("_plus", "")),
                                [LabelSpec("km", 500, 50)])
    backbone = count(model.backbone)
    assert abs(backbone - published) / published < 0.01
    cfg = model.cfg
    extra = cfg.encoder_layers * (cfg.encoder_attention_heads + (cfg.encoder_embed_dim // cfg.encoder_attention_heads + 1) * 8) \
        + cfg.num_buckets * cfg.encoder_attention_heads
    assert count(model) - count(hubert) == extra


def test_bad_bucket_settings_name_the_field():
    with pytest.raises(ConfigError, match="model.num_buckets"):
        model_config("wavlm_tiny", "model.num_buckets=7")
    with pytest.raises(ConfigError, match="model.max_distance"):
        model_config("wavlm_tiny", "model.num_buckets=320", "model.max_distance=50")
    with pytest.raises(ConfigError, match="model.arch"):
        model_config("tiny", "model.arch=conformer")
