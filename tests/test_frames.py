from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.frames import (
    CONV_LAYERS,
    conv_num_frames,
    frame_centers,
    mfcc_num_frames,
    segment_frame_labels,
)

LENGTHS = [0, 1, 399, 400, 401, 559, 560, 719, 720, 16000, 16001, 48123, 160000 + 77]


@pytest.mark.parametrize("n", LENGTHS)
def test_mfcc_frames_match_a_sliding_window(n):
    x = np.zeros(n)
    expected = 0 if n < 400 else np.lib.stride_tricks.sliding_window_view(x, 400)[::160].shape[0]
    assert mfcc_num_frames(n) == expected


@pytest.mark.parametrize("n", LENGTHS)
def test_conv_frames_match_the_hubert_conv_stack(n):
    x = torch.zeros(1, 1, n)
    for kernel, stride in CONV_LAYERS:
        if x.shape[-1] < kernel:
            x = x[..., :0]
            break
        x = torch.nn.functional.conv1d(x, torch.zeros(1, 1, kernel), stride=stride)
    assert conv_num_frames(n) == x.shape[-1]


def test_conv_frame_receptive_field_and_hop():
    # Perturbing sample s changes exactly the conv frames whose window [320 i, 320 i + 400)
    # contains s; this pins down the centre convention used for labels.
    torch.manual_seed(0)
    convs = [torch.nn.Conv1d(1, 1, k, s, bias=False) for k, s in CONV_LAYERS]

    def encode(x):
        for conv in convs:
            x = conv(x)
        return x

    n = 6400
    base = encode(torch.zeros(1, 1, n))
    for s in (0, 319, 320, 400, 3333):
        x = torch.zeros(1, 1, n)
        x[..., s] = 1.0
        changed = set(torch.nonzero((encode(x) - base).abs()[0, 0] > 0).flatten().tolist())
        assert changed == {i for i in range(conv_num_frames(n)) if 320 * i <= s < 320 * i + 400}


def test_segment_frame_labels_use_frame_centres():
    ends = np.array([300, 700, 1000])  # three segments
    ids = np.array([0, 5, 9])
    labels = segment_frame_labels(ends, ids, 1000, 100)
    centres = frame_centers(1000, 100)
    assert len(labels) == mfcc_num_frames(1000) == 4
    assert centres.tolist() == [200, 360, 520, 680]
    assert labels.tolist() == [0, 5, 5, 5]
    with pytest.raises(ValueError, match="end at the last sample"):
        segment_frame_labels(ends, ids, 1001, 100)
