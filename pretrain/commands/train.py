"""``pretrain train`` (one rank of it: started by ``launch local`` or ``srun``)."""

from __future__ import annotations

import json
import os

from pretrain.config.train import TrainConfig
from pretrain.distributed import engine, read_env
from pretrain.lifecycle import fail_fast
from pretrain.train.loop import train


def train_command(cfg: TrainConfig, argv: list[str], progress: bool) -> int:
    try:
        # PRETRAIN_FAULT injects failures for the recovery tests (see train()); unset in real runs.
        result = train(cfg, argv, fault=json.loads(os.environ.get("PRETRAIN_FAULT", "{}")))
    except BaseException as e:  # noqa: BLE001 - any error on any rank ends the whole job, at once
        fail_fast("pretrain train", read_env().rank, e)
    # does not return: a clean exit for every rank (non-zero after a preemption that was not
    # requeued, see pretrain.train.loop.handle_preemption)
    engine.shutdown(result.get("exit_code", 0))
    return 0
