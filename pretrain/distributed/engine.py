"""The process group and the DeepSpeed engine, built from our typed config.

On CPU DeepSpeed needs ``DS_ACCELERATOR=cpu`` before it is imported and talks over gloo;
torch's AdamW is used there (DeepSpeed's own CPU Adam compiles for ~90 s). The learning rate
is set by the trainer each step from a pure function of the step, so no scheduler state exists.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist

# DeepSpeed's ZeRO gathers call this torch function, deprecated for a successor DeepSpeed does
# not use yet: the warning says nothing a user can act on and repeats in every run's log.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)

from pretrain.config.train import TrainConfig
from pretrain.distributed import DistEnv, export_env
from pretrain.utils import PretrainError


def init_process_group(dist_env: DistEnv, timeout: float = 1800.0) -> None:
    """Join the job's process group; every collective then fails after ``timeout`` seconds
    without the other ranks (``train.collective_timeout``)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    export_env(dist_env)
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=datetime.timedelta(seconds=timeout))


def deepspeed_config(cfg: TrainConfig, load_universal: bool = False) -> dict:
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": 1,  # batches are built by token budget, not count
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: TrainConfig, load_universal: bool = False) -> Any:
    """The engine; ``load_universal`` when the checkpoint to load was converted by
    :func:`to_universal` (resuming with another process count)."""
    import deepspeed

    if cfg.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise PretrainError("deepspeed.precision=fp16 needs a GPU: DeepSpeed's CPU accelerator has no fp16 "
                            "support; use bf16 or fp32 on the CPU")
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    # DeepSpeed stores this attribute with every save; its converter to the universal format
    # (the only way to load ZeRO-partitioned optimizer state at another process count)
    # refuses checkpoints without it.
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})

    optim = cfg.optim
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # Biases, norms and embeddings are not decayed.
        (no_decay if param.ndim < 2 or "label_embs" in name or "masked_spec_embed" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  fused=fused if fused else None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, load_universal))
    return engine


def to_universal(src: str, dst: str) -> None:
    """Convert the DeepSpeed checkpoint folder ``src`` (one tag) into the universal format at
    ``dst``, in this process (the converter's worker pools are not needed at our sizes)."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False))


def optimizer_step(engine: Any) -> bool:
    """``engine.step()``, unless the gradient is non-finite on some rank; returns whether the
    update was applied.

    DeepSpeed's ZeRO 1-3 optimizers and its bf16/fp16 wrappers check the gradient themselves
    and skip such a step (counted in ``engine.skipped_steps``). With ZeRO 0 in fp32 the
    optimizer is torch's own and applies anything, so the check is ours: every rank learns
    whether any rank holds a non-finite gradient and, if so, zeroes its gradients and takes the
    step at learning rate 0, which leaves every parameter as it was (DeepSpeed's clipping
    fails on a model without gradients, so they cannot simply be dropped).
    """
    dropped = False
    if type(engine.optimizer).__module__.startswith("torch.optim"):
        bad = any(not torch.isfinite(p.grad).all() for p in engine.module.parameters() if p.grad is not None)
        if all_reduce_sum([float(bad)])[0] > 0:
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0
            dropped = True
    before = engine.skipped_steps
    engine.step()
    return not dropped and engine.skipped_steps == before


def full_state_dict(engine: Any) -> dict | None:
    """The whole model's weights on rank 0 (``None`` elsewhere). Call on every rank: under
    ZeRO 3 the parameters are partitioned and gathering them is a collective."""
    import deepspeed

    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if is_main else None
    return engine.module.state_dict() if is_main else None


def state_fingerprint(engine: Any) -> dict | None:
    """Float64 sums that identify the weights and Adam's moments whatever their partitioning
    (``sum |w|``, ``sum |m|``, ``sum v``), on rank 0; logged at every resume so that a resume at
    another process count can be checked against the saved files. A collective."""
    weights = full_state_dict(engine)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's optimizer
    states = [st for st in inner.state.values() if "exp_avg" in st]
    m = sum(float(st["exp_avg"].double().abs().sum()) for st in states)
    v = sum(float(st["exp_avg_sq"].double().sum()) for st in states)
    if engine.zero_optimization_stage() > 0:  # each rank holds its partition (padding is zero)
        m, v = all_reduce_sum([m, v])
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    w = sum(float(t.double().abs().sum()) for t in weights.values() if t.is_floating_point())
    return {"weights_abs_sum": w, "adam_m_abs_sum": m, "adam_v_sum": v}


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum of each value over ranks (float64 on CPU: exact for counts)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(code: int = 0) -> None:
    """End the process cleanly with exit status ``code``: DeepSpeed's own teardown sometimes
    aborts a rank at exit (7 % of 2-rank runs here); a barrier, a flush and ``os._exit`` never
    did (55/55)."""
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
