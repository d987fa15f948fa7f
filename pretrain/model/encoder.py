"""HuBERT's backbone: convolutional waveform encoder, feature projection, convolutional
relative positional embedding and Transformer (post-LN as in BASE, pre-LN as in LARGE).

Parameter names follow ``transformers.HubertModel`` (``feature_extractor.conv_layers.0.conv``,
``encoder.layers.3.attention.q_proj``, ...), so exporting is a copy of the backbone's state
dict, and users find the names they know. Pure ``nn.Module``s: no distribution code here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.frames import CONV_LAYERS

CONV_CHANNELS = 512


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
    def __init__(self, dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(CONV_CHANNELS)
        self.projection = nn.Linear(CONV_CHANNELS, dim)


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


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pre_ln = cfg.layer_norm_first
        self.attention = Attention(dim, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, cfg.encoder_ffn_embed_dim, cfg.activation_dropout, cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), attn_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, attn_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.layer_norm_first
        self.layerdrop = cfg.encoder_layerdrop
        self.pos_conv_embed = PositionalConv(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None,
                output_layer: int | None = None) -> torch.Tensor:
        """Hidden states after layer ``output_layer`` (1-based), or the encoder's output.

        ``padding_mask`` is (B, T), True at padded frames; padded frames are zeroed first and
        never attended to.
        """
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
            attn_mask = ~padding_mask[:, None, None, :]
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        x = self.dropout(x)
        last = len(self.layers) if output_layer is None else output_layer
        for layer in self.layers[:last]:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue  # LayerDrop
            x = layer(x, attn_mask)
        # As in fairseq, a requested layer's output is raw; the pre-LN stack's final norm
        # belongs to the full encoder output only.
        if self.pre_ln and output_layer is None:
            x = self.layer_norm(x)
        return x
