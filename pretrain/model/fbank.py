"""Log-mel filterbank (Fbank) front end: a fixed, parameter-free alternative to the
convolutional waveform encoder (``model.frontend: fbank``), as Fast-HuBERT and MelHuBERT use.

On a CPU the waveform encoder is most of a small model's cost (issue 10 measured about 70 %);
an Fbank costs almost nothing and gives the Transformer a spectral input from the first step.

Frames are on the conv encoder's 50 Hz grid exactly, so labels, padding masks and feature
counts are unchanged (``pretrain.frames``): the model has ``conv_num_frames(n)`` frames, and
frame ``i`` is centred on sample ``320 i + 200``, like the conv encoder's receptive field
``[320 i, 320 i + 400)``. Its vector stacks the Kaldi log-mel spectra (25 ms windows every
10 ms, ``pretrain.kaldi``'s analysis, as the MFCC's without the DCT) of the 100 Hz frames
``2i - c .. 2i + c`` (``c = fbank_context``); 100 Hz frame ``2i`` has the same centre as 50 Hz
frame ``i``. Context frames outside an utterance repeat its first or last frame, computed per
utterance from its own length, so an utterance's features do not depend on the padding of the
batch it is in.

``fbank_norm: utterance`` subtracts each utterance's mean and divides by its standard deviation
per dimension over its valid frames (CMVN), which removes the channel and much of the speaker's
spectral tilt before the model sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.frames import MFCC_HOP, MFCC_WINDOW, conv_num_frames, mfcc_num_frames
from pretrain.kaldi import EPS, FFT_SIZE, PREEMPHASIS, WINDOW, mel_banks


class FbankFrontEnd(nn.Module):
    """Waveform (B, S) and lengths (B,) -> features (B, T, bins * (2 context + 1)) at 50 Hz."""

    def __init__(self, bins: int, context: int, norm: str):
        super().__init__()
        self.bins, self.context, self.norm = bins, context, norm
        self.out_dim = bins * (2 * context + 1)
        # Not persistent: constants of the analysis, not learned state; DeepSpeed's bf16 cast
        # would round them, so forward reads them in float32.
        self.register_buffer("banks", torch.tensor(mel_banks(bins).T, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.tensor(WINDOW, dtype=torch.float32), persistent=False)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, M, bins) Kaldi log-mel energies on the 100 Hz grid (``mfcc_num_frames(S)`` frames)."""
        x = waveform.float()
        if x.shape[1] < MFCC_WINDOW:
            return x.new_zeros(x.shape[0], 0, self.bins)
        frames = x.unfold(1, MFCC_WINDOW, MFCC_HOP)
        frames = frames - frames.mean(-1, keepdim=True)
        frames = torch.cat([frames[..., :1] * (1 - PREEMPHASIS),
                            frames[..., 1:] - PREEMPHASIS * frames[..., :-1]], dim=-1)
        power = torch.fft.rfft(frames * self.window.float(), n=FFT_SIZE).abs().pow(2)
        return torch.log(torch.clamp(power @ self.banks.float(), min=EPS))

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, s = waveform.shape
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long)
        lengths = [int(n) for n in lengths]
        num = conv_num_frames(s)
        logmel = self.log_mel(waveform)
        if num == 0:
            return logmel.new_zeros(b, 0, self.out_dim)
        last = torch.tensor([max(mfcc_num_frames(n) - 1, 0) for n in lengths], device=logmel.device)
        offsets = torch.arange(-self.context, self.context + 1, device=logmel.device)
        idx = 2 * torch.arange(num, device=logmel.device)[:, None] + offsets[None, :]  # (T, 2c+1)
        idx = torch.minimum(idx.clamp(min=0)[None], last[:, None, None])  # (B, T, 2c+1)
        stacked = torch.gather(logmel, 1, idx.reshape(b, -1, 1).expand(-1, -1, self.bins))
        feats = stacked.reshape(b, num, self.out_dim)
        valid = torch.arange(num, device=feats.device)[None, :] < torch.tensor(
            [conv_num_frames(n) for n in lengths], device=feats.device)[:, None]
        if self.norm == "utterance":
            w = valid[..., None].float()
            count = w.sum(1, keepdim=True).clamp(min=1)
            mean = (feats * w).sum(1, keepdim=True) / count
            var = ((feats - mean).pow(2) * w).sum(1, keepdim=True) / count
            feats = (feats - mean) / torch.sqrt(var + 1e-5)
        return feats * valid[..., None]

