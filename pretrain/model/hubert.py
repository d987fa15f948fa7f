"""HuBERT pretraining model: backbone plus the masked-prediction objective.

Loss contract (what the trainer relies on): ``forward`` returns ``loss_sum``, a *sum* over
frames — cross-entropy summed over masked frames (times ``pred_masked_weight``) and over unmasked
frames (times ``pred_nomask_weight``), for every label set — plus the feature penalty times
``feature_pen_weight`` times ``sample_size``, where ``sample_size`` is this batch's number of
masked frames (fairseq's convention, so that the penalty keeps its weight after
normalization). The trainer divides by the *global* ``sample_size`` (summed over ranks and
accumulation steps), which makes the gradient independent of how a batch is split over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.frames import conv_num_frames
from pretrain.model.encoder import CONV_CHANNELS, Encoder, FeatureExtractor, FeatureProjection
from pretrain.model.fbank import FbankFrontEnd
from pretrain.model.masking import compute_span_mask

FRAME_RATE = 50


class _GradMultiply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def frame_padding_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, T) True at 50 Hz frames that lie past an utterance's samples."""
    valid = torch.tensor([conv_num_frames(int(n)) for n in lengths], device=lengths.device)
    return torch.arange(num_frames, device=lengths.device)[None, :] >= valid[:, None]


def init_bert_params(model: nn.Module) -> None:
    """BERT-style initialization, as fairseq's init_bert_params does for the Transformer (and
    He initialization of the waveform encoder's convolutions)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # WavLM's relative-position buckets
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Conv1d) and "feature_extractor" in name:
            nn.init.kaiming_normal_(module.weight)


def span_mask(cfg: ModelConfig, lengths: torch.Tensor, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, frames) span mask over each utterance's unpadded 50 Hz frames (``cfg.mask_*``)."""
    padding = frame_padding_mask(lengths, frames)
    return compute_span_mask((~padding).sum(1).tolist(), frames, cfg.mask_prob, cfg.mask_length, rng,
                             cfg.mask_min_spans) & ~padding


@dataclass
class LabelSpec:
    """A label set the model predicts: its name, number of classes and label rate (Hz)."""

    name: str
    num_classes: int
    rate: int


class HubertBackbone(nn.Module):
    """Waveform -> hidden states; the part exported to ``transformers.HubertModel``. The front
    end is the conv waveform encoder or a fixed Fbank (``cfg.frontend``); both give frames on
    the same 50 Hz grid."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.frontend == "fbank":
            self.fbank = FbankFrontEnd(cfg.fbank_bins, cfg.fbank_context, cfg.fbank_norm)
            in_dim = self.fbank.out_dim
        else:
            self.feature_extractor = FeatureExtractor(cfg.extractor_mode, cfg.conv_bias)
            in_dim = CONV_CHANNELS
        self.feature_projection = FeatureProjection(cfg.encoder_embed_dim, in_dim)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.encoder = Encoder(cfg)

    def normalize(self, waveform: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Zero mean, unit variance over each utterance's valid samples. The epsilon is that of
        transformers' Wav2Vec2FeatureExtractor, so an exported model sees the same input."""
        if not self.cfg.normalize_waveform:
            return waveform
        if lengths is None:
            lengths = torch.full(waveform.shape[:1], waveform.shape[1], device=waveform.device)
        valid = (torch.arange(waveform.shape[1], device=waveform.device)[None, :] < lengths[:, None]).float()
        count = valid.sum(1, keepdim=True)
        mean = (waveform * valid).sum(1, keepdim=True) / count
        var = (((waveform - mean) * valid) ** 2).sum(1, keepdim=True) / count
        return (waveform - mean) / torch.sqrt(var + 1e-7) * valid

    def features(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Front-end output (B, T, C): the waveform encoder's (C = 512, gradient scaled by
        feature_grad_mult) or the Fbank's (in the waveform's dtype)."""
        if self.cfg.frontend == "fbank":
            return self.fbank(waveform, lengths).to(waveform.dtype)
        scale = self.cfg.feature_grad_mult
        if scale > 0:
            feats = self.feature_extractor(waveform)
            if scale != 1.0 and self.training:
                feats = _GradMultiply.apply(feats, scale)
        else:
            with torch.no_grad():
                feats = self.feature_extractor(waveform)
        return feats.transpose(1, 2)

    def _encoder_input(self, waveform: torch.Tensor, lengths: torch.Tensor | None):
        """Front-end output, projected encoder input and frame padding mask."""
        feats = self.features(self.normalize(waveform, lengths), lengths)
        padding = frame_padding_mask(lengths, feats.shape[1]) if lengths is not None else None
        return feats, self.feature_projection.projection(self.feature_projection.layer_norm(feats)), padding

    @torch.no_grad()
    def hidden_states(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None,
                      layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of ``layer`` (1-based; None: the last, normed) and the frame padding mask,
        for feature dumping. Call in eval mode."""
        _, x, padding = self._encoder_input(waveform, lengths)
        return self.encoder(x, padding, output_layer=layer), padding

    @torch.no_grad()
    def all_hidden_states(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None,
                          front_end: bool = False, upto: int | None = None
                          ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Every Transformer layer's hidden states (layers 1..``upto``, default all, as
        ``hidden_states`` gives each) from one forward, preceded by the front end's output when
        ``front_end``, and the frame padding mask. Call in eval mode."""
        feats, x, padding = self._encoder_input(waveform, lengths)
        states: list[torch.Tensor] = [feats] if front_end else []
        self.encoder(x, padding, output_layer=upto or self.cfg.encoder_layers, collect=states)
        return states, padding


class HubertPretrain(nn.Module):
    """Backbone + label embeddings + ``final_proj``; forward computes the HuBERT loss."""

    def __init__(self, cfg: ModelConfig, labels: list[LabelSpec]):
        super().__init__()
        # No label sets: a backbone alone (a model imported from transformers or fairseq), for
        # features, probes and ``init_from``; it has no pretraining loss.
        for spec in labels:
            if spec.rate % FRAME_RATE:
                raise ValueError(f"label set '{spec.name}': rate {spec.rate} Hz is not a multiple of "
                                 f"the model's {FRAME_RATE} Hz frame rate")
        self.cfg = cfg
        self.labels = labels
        self.backbone = HubertBackbone(cfg)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        proj_dim = cfg.final_dim * (len(labels) if cfg.untie_final_proj else 1)
        self.final_proj = nn.Linear(cfg.encoder_embed_dim, proj_dim)
        self.label_embs = nn.ParameterList(
            nn.Parameter(torch.empty(spec.num_classes, cfg.final_dim).uniform_()) for spec in labels)
        init_bert_params(self)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, targets: dict[str, torch.Tensor],
                mask: torch.Tensor | None = None, rng: np.random.Generator | None = None,
                feature_pen_scale: float | None = None) -> dict:
        """HuBERT loss of a padded batch.

        ``audio`` (B, S), ``lengths`` (B,) samples, ``targets[name]`` (B, F) labels at the label
        set's rate (padding is ignored). ``mask`` (B, T) or ``rng`` to draw one: one is required
        when ``mask_prob > 0``.

        ``loss_sum`` is the summed cross-entropy plus ``feature_pen_weight * P * feature_pen_scale``
        where ``P`` sums, over unpadded frames, the mean square of the waveform encoder's
        output. The scale defaults to this batch's masked/unpadded frame ratio (fairseq's
        penalty is the same mean times the masked count, but over padding too). The trainer
        passes the ratio of the counts over all ranks, which makes the penalty, like the
        cross-entropy, independent of how a batch is split over ranks.
        """
        if not self.labels:
            raise ValueError("this model has no label sets (a backbone imported from transformers or fairseq): "
                             "train a new run from it with init_from=MODEL")
        backbone = self.backbone
        feats = backbone.features(backbone.normalize(audio, lengths), lengths)
        padding = frame_padding_mask(lengths, feats.shape[1])
        unpadded = int((~padding).sum())
        # The Fbank is fixed: a penalty on it would be a constant without gradient.
        feature_pen = (feats.float().pow(2).mean(-1) * (~padding)).sum() if self.cfg.frontend == "conv" \
            else feats.new_zeros((), dtype=torch.float32)
        feats, padding, targets = self._align_targets(feats, padding, targets)
        x = backbone.feature_projection.projection(backbone.feature_projection.layer_norm(feats))
        x = self.dropout_input(x)

        if mask is None:
            if self.cfg.mask_prob > 0 and rng is None:
                raise ValueError("pass mask= or rng= (a numpy Generator) to draw the span mask")
            valid = (~padding).sum(1).tolist()
            mask = compute_span_mask(valid, x.shape[1], self.cfg.mask_prob, self.cfg.mask_length, rng,
                                     self.cfg.mask_min_spans) if self.cfg.mask_prob > 0 \
                else torch.zeros_like(padding)
        mask = mask.to(x.device) & ~padding
        x = torch.where(mask[..., None], backbone.masked_spec_embed.to(x.dtype), x)
        x = backbone.encoder(x, padding)

        masked, unmasked = mask, ~mask & ~padding
        sample_size = int(masked.sum())
        out: dict = {"sample_size": sample_size, "num_masked": sample_size,
                     "num_unmasked": int(unmasked.sum()), "feature_pen": feature_pen.detach() / max(unpadded, 1)}
        loss = x.new_zeros((), dtype=torch.float32)
        proj = self.final_proj(x)
        chunks = proj.chunk(len(self.labels), dim=-1) if self.cfg.untie_final_proj else [proj] * len(self.labels)
        for spec, emb, p in zip(self.labels, self.label_embs, chunks):
            target = targets[spec.name]
            for kind, where, weight in (("masked", masked, self.cfg.pred_masked_weight),
                                        ("unmasked", unmasked, self.cfg.pred_nomask_weight)):
                if not where.any():
                    out[f"correct_{kind}/{spec.name}"] = 0
                    if kind == "masked":
                        out[f"pred_hist/{spec.name}"] = torch.zeros(spec.num_classes, dtype=torch.long)
                        out[f"target_hist/{spec.name}"] = torch.zeros(spec.num_classes, dtype=torch.long)
                    continue
                logits = self._logits(p[where], emb)
                t = target[where]
                if (t < 0).any() or (t >= spec.num_classes).any():
                    raise ValueError(f"label set '{spec.name}': targets outside [0, {spec.num_classes}) "
                                     "on unpadded frames")
                ce = F.cross_entropy(logits.float(), t, reduction="sum")
                if weight > 0:
                    loss = loss + weight * ce
                out[f"loss_{kind}/{spec.name}"] = ce.detach()
                pred = logits.argmax(-1)
                out[f"correct_{kind}/{spec.name}"] = int((pred == t).sum())
                if kind == "masked":  # label usage: how many classes are targets, and predicted
                    out[f"pred_hist/{spec.name}"] = torch.bincount(pred, minlength=spec.num_classes).cpu()
                    out[f"target_hist/{spec.name}"] = torch.bincount(t, minlength=spec.num_classes).cpu()
        if feature_pen_scale is None:
            feature_pen_scale = sample_size / max(unpadded, 1)
        loss = loss + self.cfg.feature_pen_weight * feature_pen * feature_pen_scale
        out["loss_sum"] = loss
        return out

    def num_frames(self, num_samples: int, targets: dict[str, torch.Tensor]) -> int:
        """Frames the loss covers for a batch padded to ``num_samples``: the encoder's output,
        cut where a label set ends."""
        frames = conv_num_frames(num_samples)
        for spec in self.labels:
            ratio = spec.rate // FRAME_RATE
            frames = min(frames, (targets[spec.name].shape[1] - 1) // ratio + 1)
        return frames

    def draw_mask(self, lengths: torch.Tensor, num_samples: int, targets: dict[str, torch.Tensor],
                  rng: np.random.Generator) -> torch.Tensor:
        """The span mask ``forward`` would draw, drawn ahead so that the trainer can count the
        masked frames of every rank before the forward pass (the loss normalizer)."""
        return span_mask(self.cfg, lengths, self.num_frames(num_samples, targets), rng)

    def _logits(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every class embedding, over the temperature."""
        return F.normalize(x.float(), dim=-1) @ F.normalize(emb.float(), dim=-1).T / self.cfg.logit_temp

    def _align_targets(self, feats, padding, targets):
        """Put every label set on the 50 Hz frames: frame i takes label i * rate / 50 (the
        label frame with the same centre), and frames without a label are cut, as fairseq does."""
        for spec in self.labels:
            if spec.name not in targets:
                raise KeyError(f"no targets for label set '{spec.name}'")
        frames = min(feats.shape[1], self.num_frames(10**12, targets))
        aligned = {}
        for spec in self.labels:
            ratio = spec.rate // FRAME_RATE
            idx = torch.arange(frames, device=feats.device) * ratio
            aligned[spec.name] = targets[spec.name][:, idx].to(feats.device)
        return feats[:, :frames], padding[:, :frames], aligned
