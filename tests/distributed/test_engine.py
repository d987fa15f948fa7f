from __future__ import annotations

import pytest
import torch

from pretrain.distributed.engine import build_engine, deepspeed_config
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.utils import PretrainError
from tests.train.test_loop import cfg


def test_the_deepspeed_config_follows_the_typed_one():
    ds = deepspeed_config(cfg("deepspeed.zero_stage=2", "deepspeed.grad_accum=4", "deepspeed.precision=bf16",
                              "optim.clip_grad=1.5"), load_universal=True)
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["checkpoint"] == {"load_universal": True}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_fp16_on_the_cpu_is_refused_with_the_field_named():
    c = cfg("deepspeed.precision=fp16")
    with pytest.raises(PretrainError, match="deepspeed.precision=fp16 needs a GPU"):
        build_engine(HubertPretrain(c.model, [LabelSpec("km", 10, 50)]), c)
