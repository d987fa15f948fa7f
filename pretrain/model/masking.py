"""Span masking as in HuBERT/wav2vec 2.0, drawn from an explicit numpy generator.

For an utterance of ``T`` valid frames, ``round_random(mask_prob * T / mask_length)`` span
starts (at least ``min_spans``) are chosen without replacement among the first
``T - mask_length`` frames, and each span covers ``mask_length`` frames (spans may overlap;
frames past ``T`` are never masked). With ``mask_prob = 0.8`` and ``mask_length = 10`` about
``1 - 0.92^10 = 57 %`` of frames end up masked. Unlike fairseq we do not equalize the number of
masked frames across a batch: the loss is normalized by the masked-frame count anyway.

The generator is the caller's: the trainer derives it from (seed, step, rank), so a resumed run
draws exactly the masks of the uninterrupted one, and no global RNG is touched.
"""

from __future__ import annotations

import numpy as np
import torch


def compute_span_mask(valid_frames: list[int] | np.ndarray, total_frames: int, mask_prob: float,
                      mask_length: int, rng: np.random.Generator, min_spans: int = 2) -> torch.Tensor:
    """Boolean (B, total_frames) mask; row b masks only within its first ``valid_frames[b]``."""
    mask = np.zeros((len(valid_frames), total_frames), dtype=bool)
    for b, valid in enumerate(valid_frames):
        valid = int(valid)
        if valid <= 0 or mask_prob <= 0:
            continue
        spans = int(mask_prob * valid / mask_length + rng.random())
        spans = max(min_spans, spans)
        span = min(mask_length, valid)
        positions = valid - span + 1  # starts whose span stays inside the utterance
        spans = min(spans, positions)
        if spans <= 0:
            continue
        starts = rng.choice(positions, size=spans, replace=False)
        idx = (starts[:, None] + np.arange(span)[None, :]).reshape(-1)
        mask[b, idx] = True
    return torch.from_numpy(mask)
