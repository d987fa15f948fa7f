"""wav2vec 2.0 pretraining (Baevski et al., 2020) on the HuBERT backbone: the same front end,
Transformer, masking and data; no labels and no teacher. The targets are the unmasked
front-end output of the masked frames, quantized by a product of ``G`` learned codebooks of
``V`` entries through a Gumbel softmax (straight-through hard codes in the forward), and the
loss is contrastive: at every masked frame the context vector (``project_hid`` of the
Transformer's output) must pick its own quantized target (``project_q`` of the codes) among
``K`` distractors, the quantized targets of other masked frames of the same utterance, by
cosine similarity over ``logit_temp``. A diversity loss keeps the codebooks in use.

Names follow ``transformers.Wav2Vec2ForPreTraining`` (``quantizer.codevectors``,
``quantizer.weight_proj``, ``project_q``, ``project_hid``) so that the heads export as they
are. What differs from it, deliberately: only the masked frames are quantized (they are the
only targets; transformers quantizes every frame and uses the masked ones), and the Gumbel
noise and the distractors come from an explicit generator (the trainer seeds it from the
run's seed, the step and the rank, so a resumed run draws exactly what the uninterrupted one
would have), not from the global RNG. Given the same noise and distractors, the losses are
transformers' (tested within 1e-4).

Loss contract (as ``HubertPretrain``'s, what the trainer relies on): ``loss_sum`` is the
contrastive cross-entropy summed over masked frames, plus ``diversity_weight`` times
``(GV - perplexity) / GV`` times the masked-frame count (fairseq's and transformers'
convention), plus the feature penalty; ``sample_size`` is the number of masked frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.model import ModelConfig
from pretrain.frames import conv_num_frames
from pretrain.model.encoder import CONV_CHANNELS
from pretrain.model.hubert import HubertBackbone, frame_padding_mask, init_bert_params, span_mask


def gumbel_temperature(cfg: ModelConfig, updates: int) -> float:
    """The Gumbel-softmax temperature after ``updates`` optimizer updates: a function of the
    step alone, so a resumed run continues the schedule exactly."""
    w = cfg.wav2vec2
    return max(w.temp_start * w.temp_decay ** updates, w.temp_end)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise, -log(-log U), from ``generator`` (float64 uniforms, so that no
    draw is 0 or 1 in float32 terms)."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    exponential = -torch.log(uniform.clamp(min=1e-300))
    return (-torch.log(exponential.clamp(min=1e-300))).float()


def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each group's distribution (G, V) -> (G,), with transformers' (and
    fairseq's) 1e-7 inside the log."""
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1))


class GumbelQuantizer(nn.Module):
    """Product quantization with G codebooks of V entries, chosen by a Gumbel softmax."""

    def __init__(self, in_dim: int, groups: int, num_vars: int, dim: int):
        super().__init__()
        self.groups, self.num_vars = groups, num_vars
        self.weight_proj = nn.Linear(in_dim, groups * num_vars)
        self.codevectors = nn.Parameter(torch.empty(1, groups * num_vars, dim // groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq's and transformers' initialization: logits start spread, codevectors uniform.
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        nn.init.uniform_(self.codevectors)

    def forward(self, x: torch.Tensor, temperature: float, gumbel: torch.Tensor | None) -> dict:
        """Codes of ``x`` (N, in_dim): ``codes`` (N, dim); ``soft`` (G, V), the softmax averaged
        over the N frames; ``hard`` (G, V), each entry's count of argmax choices. ``gumbel``
        (N, G, V) is the noise of a training forward; without it the codes are the argmax (eval)."""
        n = x.shape[0]
        logits = self.weight_proj(x).float().view(n, self.groups, self.num_vars)
        soft = torch.softmax(logits, dim=-1)
        index = logits.argmax(-1)
        hard = F.one_hot(index, self.num_vars).to(logits.dtype)
        if gumbel is not None:
            noisy = torch.softmax((logits + gumbel) / temperature, dim=-1)
            chosen = F.one_hot(noisy.argmax(-1), self.num_vars).to(noisy.dtype)
            probs = chosen - noisy.detach() + noisy  # straight-through: hard forward, soft gradient
        else:
            probs = hard
        codes = (probs.view(n, -1, 1).to(self.codevectors.dtype) * self.codevectors[0]).view(
            n, self.groups, self.num_vars, -1).sum(-2).reshape(n, -1)
        return {"codes": codes, "soft": soft.mean(0) if n else soft.new_zeros(self.groups, self.num_vars),
                "hard": hard.sum(0)}


def sample_negatives(counts: list[int], k: int, generator: torch.Generator) -> torch.Tensor:
    """(N, k) indices into the N = sum(counts) masked frames, listed utterance by utterance:
    frame i of an utterance with n masked frames gets k draws, uniform with replacement, among
    the utterance's other n - 1 masked frames (fairseq's rule: draw from n - 1, shift the draws
    at or after i by one). An utterance with one masked frame has no other: its draws are the
    frame itself, which the loss then never counts as a distractor."""
    out, start = [], 0
    for n in counts:
        if n == 1:
            out.append(torch.full((1, k), start, dtype=torch.long))
        elif n > 1:
            draws = torch.randint(0, n - 1, (n, k), generator=generator)
            draws += (draws >= torch.arange(n)[:, None]).long()
            out.append(draws + start)
        start += n
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


class Wav2Vec2Pretrain(nn.Module):
    """Backbone + quantizer + the two projections; ``forward`` computes the wav2vec 2.0 loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.labels: list = []  # no label sets (the model file and the trainer read this)
        self.backbone = HubertBackbone(cfg)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        w = cfg.wav2vec2
        in_dim = self.backbone.fbank.out_dim if cfg.frontend == "fbank" else CONV_CHANNELS
        self.quantizer = GumbelQuantizer(in_dim, w.num_groups, w.num_vars, w.codevector_dim)
        self.project_q = nn.Linear(w.codevector_dim, cfg.final_dim)
        self.project_hid = nn.Linear(cfg.encoder_embed_dim, cfg.final_dim)
        init_bert_params(self)
        self.quantizer.reset_parameters()  # not BERT's 0.02: see GumbelQuantizer

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, targets: dict | None = None,
                mask: torch.Tensor | None = None, rng: np.random.Generator | None = None,
                feature_pen_scale: float | None = None, generator: torch.Generator | None = None,
                temperature: float | None = None, gumbel: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None) -> dict:
        """wav2vec 2.0 loss of a padded batch.

        ``mask`` (B, T) or ``rng`` to draw one. The distractors and, in training mode, the
        Gumbel noise come from ``generator`` (a CPU ``torch.Generator``), or are given: ``negatives``
        (N, K) indices into the N masked frames (row-major over the batch), ``gumbel`` (N, G, V).
        ``temperature`` defaults to the schedule's start. ``targets`` (label sets) is unused.
        """
        backbone, w = self.backbone, self.cfg.wav2vec2
        feats = backbone.features(backbone.normalize(audio, lengths), lengths)
        padding = frame_padding_mask(lengths, feats.shape[1])
        unpadded = int((~padding).sum())
        feature_pen = (feats.float().pow(2).mean(-1) * (~padding)).sum() if self.cfg.frontend == "conv" \
            else feats.new_zeros((), dtype=torch.float32)
        normed = backbone.feature_projection.layer_norm(feats)
        unmasked = self.dropout_features(normed)
        x = self.dropout_input(backbone.feature_projection.projection(normed))
        if mask is None:
            if rng is None:
                raise ValueError("pass mask= or rng= (a numpy Generator) to draw the span mask")
            mask = self.draw_mask(lengths, audio.shape[1], None, rng)
        mask = mask.to(x.device) & ~padding
        x = torch.where(mask[..., None], backbone.masked_spec_embed.to(x.dtype), x)
        x = backbone.encoder(x, padding)

        n = int(mask.sum())
        counts = mask.sum(1).tolist()
        if negatives is None:
            if generator is None:
                raise ValueError("pass generator= (a torch.Generator) or negatives= to choose the distractors")
            negatives = sample_negatives(counts, w.num_negatives, generator)
        if not self.training:
            gumbel = None  # evaluation takes the argmax codes
        elif gumbel is None:
            if generator is None:
                raise ValueError("a training forward needs generator= or gumbel= for the Gumbel noise")
            gumbel = gumbel_noise((n, w.num_groups, w.num_vars), generator)
        temperature = w.temp_start if temperature is None else temperature
        q = self.quantizer(unmasked[mask], temperature, None if gumbel is None else gumbel.to(x.device))
        y = self.project_q(q["codes"].to(x.dtype)).float()  # (N, final_dim)
        c = self.project_hid(x[mask]).float()
        negatives = negatives.to(x.device)
        candidates = torch.cat([y[:, None], y[negatives]], dim=1)  # (N, 1 + K, final_dim): the true one first
        logits = F.cosine_similarity(c[:, None], candidates, dim=-1) / self.cfg.logit_temp
        # A distractor whose code equals the target's cannot be told apart: never counted.
        same = (y[negatives] == y[:, None]).all(-1)
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same, float("-inf"))], dim=1)
        contrastive = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=x.device), reduction="sum")
        groups_ppl = perplexity(q["soft"])
        gv = w.num_groups * w.num_vars
        diversity = (gv - groups_ppl.sum()) / gv * n
        if feature_pen_scale is None:
            feature_pen_scale = n / max(unpadded, 1)
        loss = contrastive + w.diversity_weight * diversity + self.cfg.feature_pen_weight * feature_pen * feature_pen_scale
        # fairseq's accuracy: the true target strictly above every distractor.
        best, worst = logits.argmax(-1) == 0, logits.argmin(-1) == 0
        return {"loss_sum": loss, "sample_size": n, "num_masked": n, "num_unmasked": int((~mask & ~padding).sum()),
                "contrastive_sum": contrastive.detach(), "diversity_sum": diversity.detach(),
                "correct": int((best & ~worst).sum()) if n else 0,
                "feature_pen": feature_pen.detach() / max(unpadded, 1),
                # For the log window: soft probabilities summed over masked frames, hard code counts.
                "code_soft": (q["soft"] * n).detach().double().cpu(), "code_hard": q["hard"].detach().double().cpu()}

    def draw_mask(self, lengths: torch.Tensor, num_samples: int, targets: dict | None,
                  rng: np.random.Generator) -> torch.Tensor:
        """The span mask ``forward`` would draw, drawn ahead (the trainer's loss normalizer)."""
        return span_mask(self.cfg, lengths, conv_num_frames(num_samples), rng)
