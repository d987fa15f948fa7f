"""HuBERT's backbone: convolutional waveform encoder, feature projection, convolutional
relative positional embedding (or data2vec's stack of them) and Transformer (post-LN as in
BASE, pre-LN as in LARGE), and WavLM's variant of it: the same network with a gated relative
position bias in every attention layer (``arch: wavlm``).

Parameter names follow ``transformers.HubertModel`` (``feature_extractor.conv_layers.0.conv``,
``encoder.layers.3.attention.q_proj``, ...), so exporting is a copy of the backbone's state
dict, and users find the names they know. Pure ``nn.Module``s: no distribution code here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.frames import CONV_LAYERS

CONV_CHANNELS = 512


def batch_invariant(cfg: ModelConfig) -> bool:
    """Whether an utterance's hidden states in a padded batch are those it gets alone. Not with
    BASE's group-norm waveform encoder (its first norm spans the padded time axis), nor with
    data2vec's stacked positional convolutions: padded frames are zeroed before the first one
    only (as in fairseq and transformers, whose hidden states the export must match), so the
    later ones read the padding's values near an utterance's end. Feature dumping and the
    probes run such models one utterance per forward."""
    return not ((cfg.frontend == "conv" and cfg.extractor_mode == "group_norm") or cfg.conv_pos_depth > 1)


class _ConvLayer(nn.Module):
    def __init__(self, in_dim: int, kernel: int, stride: int, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, CONV_CHANNELS, kernel, stride=stride, bias=bias)
        self.norm = norm
        if norm == "group":
            # One group per channel: normalizes each channel over time (wav2vec 2.0 BASE).
            self.layer_norm = nn.GroupNorm(CONV_CHANNELS, CONV_CHANNELS, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(CONV_CHANNELS, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    """Waveform (B, S) -> features (B, 512, T) at 50 Hz (see ``pretrain.frames``)."""

    def __init__(self, mode: str, bias: bool):
        super().__init__()
        layers = []
        for i, (kernel, stride) in enumerate(CONV_LAYERS):
            norm = "layer" if mode == "layer_norm" else ("group" if i == 0 else None)
            layers.append(_ConvLayer(1 if i == 0 else CONV_CHANNELS, kernel, stride, bias, norm))
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform[:, None, :]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Module):
    def __init__(self, dim: int, in_dim: int = CONV_CHANNELS):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim)
        self.projection = nn.Linear(in_dim, dim)


class PositionalConv(nn.Module):
    """Convolutional relative positional embedding (kernel 128, 16 groups, weight norm)."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        # fairseq's initialization, then weight norm over the kernel dimension (dim=2).
        std = (4.0 / (kernel * dim)) ** 0.5
        nn.init.normal_(conv.weight, mean=0.0, std=std)
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0  # an even kernel yields one extra frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)


class _PositionalConvLayer(nn.Module):
    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(self.layer_norm(y.transpose(1, 2)).transpose(1, 2))


class PositionalConvStack(nn.Module):
    """data2vec's positional embedding: ``depth`` grouped convolutions, each normalized (no
    parameters) and GELU'd; small kernels stacked see as far as HuBERT's one wide kernel
    (5 x 19 frames) with a quarter of its weights. Names as ``transformers.Data2VecAudioModel``."""

    def __init__(self, dim: int, kernel: int, groups: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(_PositionalConvLayer(dim, kernel, groups) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        for layer in self.layers:
            y = layer(y)
        return y.transpose(1, 2)


def relative_position_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets of ``relative = key_position - query_position``, as WavLM
    uses them: half of the buckets for keys after the query; in each half, distances below a
    quarter of ``num_buckets`` get a bucket each, longer ones logarithmically spaced buckets up
    to ``max_distance``, beyond which all share the last one."""
    half = num_buckets // 2
    exact = half // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    # clamp: log(0) would be -inf; those distances take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + log_ratio * (half - exact)).long().clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``; with ``gated`` it adds
    WavLM's gated relative position bias (parameter names as ``transformers.WavLMAttention``).

    The bias is a float ``(B, H, T, T)`` mask, so SDPA cannot use its flash kernel and every
    layer materializes (and keeps for backward) ``B * H * T^2`` floats: at BASE's 12 heads and
    15.6-s crops (780 frames) that is 29 MB per utterance per layer, 350 MB per utterance for
    the 12 layers. Budget ``data.max_tokens`` accordingly (ESPnet's WavLM recipe uses about
    2/3 of HuBERT's batch).
    """

    def __init__(self, dim: int, heads: int, dropout: float, gated: bool = False,
                 num_buckets: int = 0, max_distance: int = 0, has_bias_embedding: bool = False):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gated = gated
        if gated:
            self.num_buckets, self.max_distance = num_buckets, max_distance
            self.gru_rel_pos_const = nn.Parameter(torch.ones(1, heads, 1, 1))
            self.gru_rel_pos_linear = nn.Linear(dim // heads, 8)
            if has_bias_embedding:  # only the first layer's: the bias is shared by all layers
                self.rel_attn_embed = nn.Embedding(num_buckets, heads)

    def position_bias(self, num_frames: int) -> torch.Tensor:
        """The ungated bucket embedding d(j - i), (H, T, T), computed once per forward."""
        device = self.rel_attn_embed.weight.device
        pos = torch.arange(num_frames, device=device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.rel_attn_embed(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                position_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if self.gated:
            # The gate comes from this layer's input (WavLM's "query" before projection), per
            # head and query frame: bias = (g_u * (a * g_r - 1) + 2) * d.
            gates = self.gru_rel_pos_linear(x.view(shape).transpose(1, 2))
            gates = torch.sigmoid(gates.view(b, self.heads, t, 2, 4).sum(-1))
            gate = gates[..., :1] * (gates[..., 1:] * self.gru_rel_pos_const - 1.0) + 2.0
            bias = (gate * position_bias.to(gate.dtype)).to(q.dtype)
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            attn_mask = bias
        # SDPA: fused flash / memory-efficient kernels on GPUs.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation_dropout: float, dropout: float):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, ffn_dim)
        self.output_dense = nn.Linear(ffn_dim, dim)
        self.intermediate_dropout = nn.Dropout(activation_dropout)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, first: bool = False):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pre_ln = cfg.layer_norm_first
        self.attention = Attention(dim, cfg.encoder_attention_heads, cfg.attention_dropout,
                                   gated=cfg.arch == "wavlm", num_buckets=cfg.num_buckets,
                                   max_distance=cfg.max_distance, has_bias_embedding=first)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, cfg.encoder_ffn_embed_dim, cfg.activation_dropout, cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                position_bias: torch.Tensor | None = None, ffn_out: list | None = None) -> torch.Tensor:
        """``ffn_out``, a list, receives the feed-forward output before the layer's last
        residual connection (data2vec's target)."""
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), attn_mask, position_bias))
            ffn = self.feed_forward(self.final_layer_norm(x))
            if ffn_out is not None:
                ffn_out.append(ffn)
            return x + ffn
        x = self.layer_norm(x + self.dropout(self.attention(x, attn_mask, position_bias)))
        ffn = self.feed_forward(x)
        if ffn_out is not None:
            ffn_out.append(ffn)
        return self.final_layer_norm(x + ffn)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop
        if cfg.conv_pos_depth == 1:
            self.pos_conv_embed = PositionalConv(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
        else:
            self.pos_conv_embed = PositionalConvStack(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups,
                                                      cfg.conv_pos_depth)
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg, first=i == 0) for i in range(cfg.encoder_layers))
        self.relative_bias = cfg.arch == "wavlm"
        self.checkpoint_activations = cfg.checkpoint_activations

    def embed(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layers' input before dropout (padded frames zeroed, positional convolution, the
        post-LN stack's norm) and the attention mask."""
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
            attn_mask = ~padding_mask[:, None, None, :]
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        return x, attn_mask

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None,
                output_layer: int | None = None, collect: list | None = None) -> torch.Tensor:
        """Hidden states after layer ``output_layer`` (1-based), or the encoder's output.

        ``padding_mask`` is (B, T), True at padded frames; padded frames are zeroed first and
        never attended to. ``collect``, a list, receives every layer's output in turn (raw, as
        ``output_layer`` gives them), so all layers cost one forward.
        """
        x, attn_mask = self.embed(x, padding_mask)
        x = self.dropout(x)
        # WavLM: the first layer's bucket embedding, computed once here (not inside layer 0, so
        # that LayerDrop may skip any layer) and handed ungated to every layer.
        bias = self.layers[0].attention.position_bias(x.shape[1]) if self.relative_bias else None
        last = len(self.layers) if output_layer is None else output_layer
        for layer in self.layers[:last]:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue  # LayerDrop
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, attn_mask, bias, use_reentrant=False)
            else:
                x = layer(x, attn_mask, bias)
            if collect is not None:
                collect.append(x)
        # As in fairseq, a requested layer's output is raw; the pre-LN stack's final norm
        # belongs to the full encoder output only.
        if self.pre_ln and output_layer is None:
            x = self.layer_norm(x)
        return x
