"""Frame arithmetic shared by features, the model and the labels.

Every stage must agree on how many frames a waveform of ``n`` samples has, or labels drift
against features. Two frame grids exist, both at 16 kHz:

- 100 Hz: a 25 ms window (400 samples) every 10 ms (160), Kaldi's ``snip_edges=true``
  framing used by the MFCC features of HuBERT's first iteration:
  ``frames = 0 if n < 400 else 1 + (n - 400) // 160``.
- 50 Hz: the output of HuBERT's convolutional waveform encoder (kernels 10,3,3,3,3,2,2,
  strides 5,2,2,2,2,2,2, no padding). Its receptive field is 400 samples and its stride 320,
  so frame ``i`` covers samples ``[320 i, 320 i + 400)``.

A frame's label is the phone (or cluster) at the frame's centre sample: ``hop * i + 200`` on
both grids.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
MFCC_WINDOW = 400
MFCC_HOP = 160
CONV_LAYERS: tuple[tuple[int, int], ...] = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
"""(kernel, stride) of each layer of the HuBERT waveform encoder."""
CONV_RECEPTIVE_FIELD = 400
CONV_HOP = 320


def mfcc_num_frames(num_samples: int) -> int:
    """Frames of a 25 ms / 10 ms analysis (100 Hz) of ``num_samples`` samples."""
    if num_samples < MFCC_WINDOW:
        return 0
    return 1 + (num_samples - MFCC_WINDOW) // MFCC_HOP


def conv_num_frames(num_samples: int) -> int:
    """Frames the HuBERT convolutional encoder (50 Hz) outputs for ``num_samples`` samples."""
    n = num_samples
    for kernel, stride in CONV_LAYERS:
        if n < kernel:
            return 0
        n = (n - kernel) // stride + 1
    return n


def num_frames(num_samples: int, rate: int) -> int:
    """Frames on the 100 Hz (MFCC) or 50 Hz (encoder) grid."""
    if rate == 100:
        return mfcc_num_frames(num_samples)
    if rate == 50:
        return conv_num_frames(num_samples)
    raise ValueError(f"label rate must be 100 or 50 Hz, not {rate}")


def frame_centers(num_samples: int, rate: int) -> np.ndarray:
    """Centre sample of every frame on the given grid."""
    hop = MFCC_HOP if rate == 100 else CONV_HOP
    return np.arange(num_frames(num_samples, rate), dtype=np.int64) * hop + MFCC_WINDOW // 2


def segment_frame_labels(ends: np.ndarray, ids: np.ndarray, num_samples: int, rate: int) -> np.ndarray:
    """Per-frame label of contiguous segments given by their end samples and label ids.

    ``ends`` must be increasing and its last value must equal ``num_samples``.
    """
    ends = np.asarray(ends, dtype=np.int64)
    if len(ends) == 0 or ends[-1] != num_samples:
        raise ValueError(f"segments must end at the last sample ({num_samples})")
    centers = frame_centers(num_samples, rate)
    return np.asarray(ids)[np.searchsorted(ends, centers, side="right")]
