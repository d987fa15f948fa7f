"""data2vec pretraining (Baevski et al., 2022) on the HuBERT backbone: the same front end,
Transformer, masking and data; an EMA teacher instead of cluster labels.

The student sees the masked input and regresses, at masked frames, the teacher's targets
through a linear head (``final_proj``). The teacher (:class:`EmaTeacher`) is an exponential
moving average of the student's Transformer layers and sees the unmasked input: the student's
front end, projection, positional convolution and encoder norm are shared with it (fairseq's
``ema_transformer_only`` and ``ema_layers_only``, the published audio setting), so the front
end runs once. Targets are the average of the teacher's top K layers' feed-forward outputs
(before each layer's last residual connection), each normalized per utterance and channel over
its unpadded frames (fairseq normalizes over padding too; without padding the two agree).

Loss contract (as ``HubertPretrain``'s, what the trainer relies on): ``loss_sum`` is a sum over
masked frames of the per-frame loss (squared error, or smooth L1, summed over channels, times
``loss_scale``), and ``sample_size`` the number of masked frames, so the trainer's division by
the global count makes the gradient independent of how a batch is split.

The teacher is not a submodule of the student: it is not trained, not handed to DeepSpeed (no
optimizer state, no precision cast: its weights stay float32 whatever the student trains in,
since a 1e-4 EMA step vanishes in bf16), and it is saved in the model file beside the student.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.frames import conv_num_frames
from pretrain.model.hubert import HubertBackbone, frame_padding_mask, init_bert_params, span_mask


def ema_decay(cfg: ModelConfig, updates: int) -> float:
    """The teacher's decay for its ``updates``-th update (1-based): rising linearly from
    ``ema_decay`` to ``ema_end_decay`` over ``ema_anneal_steps`` updates, then constant."""
    d = cfg.data2vec
    if updates >= d.ema_anneal_steps:
        return d.ema_end_decay
    return d.ema_end_decay - (d.ema_end_decay - d.ema_decay) * (1.0 - updates / d.ema_anneal_steps)


def normalize_per_utterance(x: torch.Tensor, padding: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm of (B, T, C) over time, per utterance and channel, with statistics of the
    unpadded frames only (biased variance, as ``F.instance_norm``); padded frames come out 0."""
    x = x.float()
    valid = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if padding is None else (~padding).to(x.dtype)
    count = valid.sum(1).clamp(min=1.0)[:, None, None]
    w = valid[..., None]
    mean = (x * w).sum(1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * w


class EmaTeacher(nn.Module):
    """EMA copies of the student's Transformer layers, float32, never trained."""

    def __init__(self, student: Data2VecPretrain):
        super().__init__()
        self.layers = copy.deepcopy(student.backbone.encoder.layers).float()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EmaTeacher:
        return super().train(False)  # no dropout, ever

    @torch.no_grad()
    def update(self, student: Data2VecPretrain, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
        for mine, theirs in zip(self.layers.parameters(), student.backbone.encoder.layers.parameters()):
            mine.mul_(decay).add_(theirs.detach().to(mine.dtype), alpha=1.0 - decay)
        for mine, theirs in zip(self.layers.buffers(), student.backbone.encoder.layers.buffers()):
            mine.copy_(theirs)

    @torch.no_grad()
    def targets(self, student: Data2VecPretrain, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C) float32 targets from the projected, unmasked encoder input ``x``."""
        encoder = student.backbone.encoder
        # The shared part in the student's precision, the teacher's layers in float32.
        h, attn_mask = encoder.embed(x, padding)
        h = h.float()
        bias = self.layers[0].attention.position_bias(h.shape[1]) if encoder.relative_bias else None
        ffn: list[torch.Tensor] = []
        for layer in self.layers:
            h = layer(h, attn_mask, bias, ffn_out=ffn)
        top = ffn[-student.cfg.data2vec.top_k_layers:]
        return sum(normalize_per_utterance(t, padding) for t in top) / len(top)


class Data2VecPretrain(nn.Module):
    """Backbone + regression head; ``forward`` computes the data2vec loss given the teacher."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.labels: list = []  # no label sets (the model file and the trainer read this)
        self.backbone = HubertBackbone(cfg)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.final_proj = nn.Linear(cfg.encoder_embed_dim, cfg.encoder_embed_dim)
        init_bert_params(self)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, targets: dict | None = None,
                mask: torch.Tensor | None = None, rng: np.random.Generator | None = None,
                feature_pen_scale: float | None = None, teacher: EmaTeacher | None = None) -> dict:
        """data2vec loss of a padded batch. ``teacher`` is required; ``targets`` (label sets) and
        ``feature_pen_scale`` are HubertPretrain's and unused (no feature penalty, as published)."""
        if teacher is None:
            raise ValueError("data2vec's forward needs the EMA teacher (teacher=)")
        backbone = self.backbone
        feats = backbone.features(backbone.normalize(audio, lengths), lengths)
        padding = frame_padding_mask(lengths, feats.shape[1])
        x = backbone.feature_projection.projection(backbone.feature_projection.layer_norm(feats))
        y = teacher.targets(self, x.detach(), padding)
        x = self.dropout_input(x)
        if mask is None:
            if rng is None:
                raise ValueError("pass mask= or rng= (a numpy Generator) to draw the span mask")
            mask = self.draw_mask(lengths, audio.shape[1], None, rng)
        mask = mask.to(x.device) & ~padding
        x = torch.where(mask[..., None], backbone.masked_spec_embed.to(x.dtype), x)
        x = backbone.encoder(x, padding)
        pred = self.final_proj(x[mask]).float()
        target = y[mask]
        d = self.cfg.data2vec
        if d.loss_beta == 0:
            per_frame = F.mse_loss(pred, target, reduction="none").sum(-1)
        else:
            per_frame = F.smooth_l1_loss(pred, target, reduction="none", beta=d.loss_beta).sum(-1)
        scale = d.loss_scale if d.loss_scale is not None else 1.0 / pred.shape[-1] ** 0.5
        n = int(mask.sum())
        return {"loss_sum": per_frame.sum() * scale, "sample_size": n, "num_masked": n,
                "num_unmasked": int((~mask & ~padding).sum()),
                # Per-channel sums over masked frames, for the spread of targets and predictions
                # over all ranks (the collapse guard); detached, float64 on the CPU.
                "target_moments": torch.stack([target.sum(0), (target ** 2).sum(0)]).detach().double().cpu(),
                "pred_moments": torch.stack([pred.sum(0), (pred ** 2).sum(0)]).detach().double().cpu()}

    def draw_mask(self, lengths: torch.Tensor, num_samples: int, targets: dict | None,
                  rng: np.random.Generator) -> torch.Tensor:
        """The span mask ``forward`` would draw, drawn ahead (the trainer's loss normalizer)."""
        return span_mask(self.cfg, lengths, conv_num_frames(num_samples), rng)


def spread(moments: torch.Tensor, count: float) -> float:
    """Standard deviation over frames, averaged over channels, from per-channel sums
    (``[sum, sum of squares]``) of ``count`` frames: fairseq's ``target_var``/``pred_var``."""
    if count < 2:
        return float("nan")
    mean = moments[0] / count
    var = (moments[1] - count * mean ** 2) / (count - 1)
    return float(torch.sqrt(var.clamp(min=0) + 1e-6).mean())
