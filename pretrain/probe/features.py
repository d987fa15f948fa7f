"""Frozen features of every probed row, on the model's 50 Hz grid.

A *row* is one thing the probes judge: the model (one entry per layer), or a baseline — MFCC-39
and 80-bin log-mel (each 100 Hz frame ``2i`` stands for 50 Hz frame ``i``, the same centre), and
the model's architecture at random initialization (``untrained``, the "no pretraining" row).
Every row holds, per layer, one (frames, dim) float32 array of all utterances concatenated in
evaluation-set order; ``offsets`` (shared by every row) delimit the utterances, which have
``conv_num_frames(len(audio))`` frames each.

Models (our ``model.pt``, a checkpoint folder, a ``transformers`` folder) are read by
:class:`pretrain.model.states.LayerStates`: every wanted layer from one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pretrain.features.mfcc import mfcc_39
from pretrain.frames import conv_num_frames
from pretrain.model.fbank import FbankFrontEnd
from pretrain.model.states import LayerStates



@dataclass
class Row:
    name: str
    kind: str
    """``model``, ``baseline``."""
    layers: dict[int, np.ndarray]
    """Layer number (1-based; 0 for a baseline's single representation) -> (frames, dim)."""
    description: str
    encode: Optional[Callable[[list[np.ndarray], int], list[np.ndarray]]] = None
    """New waveforms and a layer -> that layer's frames per waveform (kNN-VC encodes its audio
    again with it)."""


def offsets_of(waves: list[np.ndarray]) -> np.ndarray:
    counts = [conv_num_frames(len(w)) for w in waves]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) >= n:
        return x[:n]
    if len(x) == 0:
        return np.zeros((n, x.shape[1]), dtype=x.dtype)
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def mfcc_frames(waves: list[np.ndarray], layer: int = 0) -> list[np.ndarray]:
    return [_fit(mfcc_39(w)[::2], conv_num_frames(len(w))).astype(np.float32) for w in waves]


def mfcc_row(waves: list[np.ndarray]) -> Row:
    return Row("mfcc", "baseline", {0: np.concatenate(mfcc_frames(waves))},
               "MFCC-39 (13 + deltas + delta-deltas), 100 Hz frame 2i for 50 Hz frame i", mfcc_frames)


def logmel_frames(waves: list[np.ndarray], layer: int = 0, bins: int = 80) -> list[np.ndarray]:
    # The Fbank front end without context or normalization: plain Kaldi log-mel energies on
    # the 50 Hz grid, exactly the frames the models see.
    fbank = FbankFrontEnd(bins, 0, "none")
    with torch.no_grad():
        return [fbank(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))[None],
                      torch.tensor([len(w)]))[0].numpy().astype(np.float32) for w in waves]


def logmel_row(waves: list[np.ndarray], bins: int = 80) -> Row:
    return Row("logmel", "baseline", {0: np.concatenate(logmel_frames(waves, 0, bins))},
               f"{bins}-bin Kaldi log-mel, 50 Hz", lambda w, layer: logmel_frames(w, layer, bins))


def model_encoder(states: LayerStates) -> Callable[[list[np.ndarray], int], list[np.ndarray]]:
    return lambda waves, layer: states(waves, [layer])[layer]


def model_layers(states: LayerStates, waves: list[np.ndarray], layers: list[int], progress: bool = False,
                 desc: str = "forward") -> dict[int, np.ndarray]:
    """{layer: (frames, dim)} of the ``layers`` (1-based), utterances concatenated in order."""
    return {layer: np.concatenate(parts).astype(np.float32)
            for layer, parts in states(waves, layers, progress, desc).items()}
