"""Run under torchrun by the gradient-invariance test: one step's gradients for a fixed batch
of 4 utterances, split over however many ranks there are; rank 0 saves them.

Usage: torchrun --nproc_per_node N grad_child.py OUT.pt
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pretrain.config import load_config
from pretrain.config.train import TrainConfig
from pretrain.distributed import engine as dist_engine
from pretrain.distributed import read_env
from pretrain.frames import conv_num_frames
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.train.loop import forward_backward
from tests.model.test_model import REPO


def main() -> None:
    dist = read_env()
    dist_engine.init_process_group(dist)
    # No dropout; the feature penalty stays on (weighted up so that its gradient matters): it is
    # normalized by the frame counts of all ranks, like the cross-entropy.
    cfg = load_config(TrainConfig, [REPO / "configs/model/tiny.yaml"], [
        "run_dir=unused", "data.shards=unused", "data.labels=[km]", "deepspeed.zero_stage=0",
        "deepspeed.precision=fp32", "model.dropout=0", "model.attention_dropout=0",
        "model.dropout_input=0", "model.feature_pen_weight=100", "optim.clip_grad=0"])
    torch.manual_seed(0)
    model = HubertPretrain(cfg.model, [LabelSpec("km", 30, 50)])
    engine = dist_engine.build_engine(model, cfg)

    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([24000, 20000, 24000, 16000])
    audio = torch.randn(4, 24000, generator=gen) * 0.1
    audio[torch.arange(24000)[None, :] >= lengths[:, None]] = 0.0
    frames = conv_num_frames(24000)
    targets = torch.randint(0, 30, (4, frames), generator=gen)
    masks = model.draw_mask(lengths, 24000, {"km": targets}, np.random.default_rng(2))

    per_rank = 4 // dist.world_size
    mine = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    batch = {"audio": audio[mine], "lengths": lengths[mine], "labels": {"km": targets[mine]}}
    forward_backward(engine, [batch], [masks[mine]], dist.world_size, torch.float32)
    if dist.is_main:
        torch.save({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}, sys.argv[1])
    dist_engine.shutdown()


if __name__ == "__main__":
    main()
