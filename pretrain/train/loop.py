"""``pretrain train``: HuBERT masked prediction with DeepSpeed, read top to bottom.

One optimizer step = ``grad_accum`` micro-batches on every rank. Before any forward pass the
span masks of all micro-batches are drawn (from ``(seed, step, rank, micro)``, so a resumed run
masks identically) and the masked frames are counted and summed over ranks: that global count
``N`` normalizes the loss, so the gradient is the same however a batch is split over ranks.
DeepSpeed divides each backward by ``grad_accum`` and averages gradients over ranks, hence the
``world_size * grad_accum / N`` factor below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pretrain.config import write_run_record
from pretrain.config.train import TrainConfig
from pretrain.data.pipeline import ShardLoader
from pretrain.distributed import read_env
from pretrain.distributed import engine as dist_engine
from pretrain.model.checkpoint import save_model
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from pretrain.train.metrics import MetricsLogger
from pretrain.train.schedule import learning_rate
from pretrain.utils import PretrainError

log = logging.getLogger(__name__)


def config_hash(cfg: TrainConfig) -> str:
    """Hash of what shapes the model: a checkpoint with another one must not be loaded."""
    return hashlib.sha256(json.dumps(asdict(cfg.model), sort_keys=True).encode()).hexdigest()[:16]


def _batches(loader: ShardLoader):
    """Endless batches: epoch mode restarts the loader, which moves to its next epoch."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise PretrainError("the training data yields no batch for this rank")


def train(cfg: TrainConfig, argv: list[str] | None = None, fault: dict | None = None) -> dict:
    """Train until ``cfg.optim.max_steps``; returns the last logged metrics.

    ``fault`` is for tests only: ``{"nan_at": step, "nan_rank": r}`` puts a NaN into that
    rank's loss at that step; ``{"exit_after_save": step}`` ends the process right after saving.
    """
    fault = fault or {}
    dist = read_env()
    dist_engine.init_process_group(dist)
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        write_run_record(run_dir, cfg, argv)
    dist_engine.barrier()

    loader = ShardLoader(cfg.data, rank=dist.rank, world_size=dist.world_size)
    specs = [LabelSpec(ls.name, ls.num_classes, ls.label_rate) for ls in loader.label_sets]
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = HubertPretrain(cfg.model, specs)
    engine = dist_engine.build_engine(model, cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]

    checkpoints = CheckpointManager(run_dir / "checkpoints", dist, cfg.checkpoint.keep_last, cfg.checkpoint.pin)
    step = 0
    resume = checkpoints.find_resume()
    if resume is not None:
        state = checkpoints.load(engine, resume)
        if state["config_hash"] != config_hash(cfg):
            raise PretrainError(f"checkpoint step_{resume} was trained with another model config "
                                "(shape fields changed); start a new run_dir")
        step = state["step"]
        loader.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        log.info("rank %d resumed from step %d", dist.rank, step)

    logger = MetricsLogger(run_dir, cfg.log, config=asdict(cfg), enabled=dist.is_main)
    batches = _batches(loader)
    ga = cfg.deepspeed.grad_accum
    bad_steps = 0
    sums: dict[str, float] = {}
    window_start = time.perf_counter()
    data_wait = 0.0
    last: dict = {}
    while step < cfg.optim.max_steps:
        lr = learning_rate(step, cfg.optim)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(ga)]
        data_wait += time.perf_counter() - t0
        masks = [model.draw_mask(b["lengths"], b["audio"].shape[1], b["labels"],
                                 np.random.default_rng([cfg.seed, step, dist.rank, i]))
                 for i, b in enumerate(micro)]
        nan_here = fault.get("nan_at") == step and fault.get("nan_rank") == dist.rank
        outs, skipped, global_masked = forward_backward(engine, micro, masks, dist.world_size, dtype, nan_here)
        if skipped:
            # The update is taken at learning rate 0: AdamW (decoupled decay included) then
            # leaves every parameter exactly as it was, on every rank.
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0
            bad_steps += 1
            log.warning("step %d: non-finite loss on some rank; no rank changes its parameters "
                        "(%d such steps in a row)", step, bad_steps)
            if bad_steps >= cfg.max_bad_steps:
                raise PretrainError(f"{bad_steps} consecutive steps with a non-finite loss "
                                    "(max_bad_steps); stopping. Lower the learning rate or check the data.")
        else:
            bad_steps = 0
        engine.step()
        step += 1

        # ---- metrics (global sums over ranks)
        local = _local_sums(outs, micro, specs, global_masked, dist.world_size)
        for k, v in local.items():
            sums[k] = sums.get(k, 0.0) + v
        if step % cfg.log.every == 0 or step == cfg.optim.max_steps:
            keys = sorted(sums)
            totals = dict(zip(keys, dist_engine.all_reduce_sum([sums[k] for k in keys])))
            elapsed = time.perf_counter() - window_start
            last = _metrics(totals, specs, lr, engine, elapsed, data_wait, dist.world_size)
            logger.log(step, last)
            sums, data_wait, window_start = {}, 0.0, time.perf_counter()

        if cfg.valid_shards and step % cfg.valid_every == 0:
            logger.log(step, _validate(cfg, engine, model, specs, dist, dtype), prefix="valid_")

        if step % cfg.checkpoint.every == 0 or step == cfg.optim.max_steps:
            rank_state = {"step": step, "data": loader.state_dict(), "rng": rng_state(),
                          "config_hash": config_hash(cfg)}
            checkpoints.save(engine, step, rank_state, config_hash(cfg),
                             model_file=lambda path: save_model(path, model))
            if fault.get("exit_after_save") == step:
                logger.close()
                dist_engine.shutdown()
    logger.close()
    return last


def forward_backward(engine, micro: list[dict], masks: list[torch.Tensor], world_size: int,
                     dtype: torch.dtype, inject_nan: bool = False) -> tuple[list[dict], bool, float]:
    """Forward and backward of this rank's micro-batches of one optimizer step.

    Returns the model outputs, whether some rank's loss was non-finite (then every rank ran a
    zero backward instead) and the global masked-frame count ``N``. The gradient DeepSpeed
    ends up with is ``sum over ranks and micro-batches of grad(loss_sum) / N``.
    """
    ga = len(micro)
    local_masked = float(sum(int(m.sum()) for m in masks))
    global_masked = dist_engine.all_reduce_sum([local_masked])[0]
    scale = world_size * ga / max(global_masked, 1.0)
    outs, skipped = [], False
    for batch, mask in zip(micro, masks):
        audio = batch["audio"].to(engine.device, dtype)
        targets = {k: v.to(engine.device) for k, v in batch["labels"].items()}
        out = engine(audio, batch["lengths"].to(engine.device), targets, mask=mask)
        loss = out["loss_sum"] * float("nan") if inject_nan else out["loss_sum"]
        # All ranks learn whether any rank's loss is non-finite before anyone's backward.
        if dist_engine.all_reduce_sum([float(not torch.isfinite(loss).item())])[0] > 0:
            skipped = True
            # A zero loss over every parameter keeps DeepSpeed's gradient hooks and
            # collectives in step on all ranks while contributing nothing.
            loss = sum(p.sum() * 0.0 for p in engine.module.parameters())
        else:
            loss = loss * scale
        outs.append(out)
        engine.backward(loss)
    return outs, skipped, global_masked


def _local_sums(outs, micro, specs, global_masked, world) -> dict[str, float]:
    sums = {"loss_sum": sum(float(o["loss_sum"].detach()) for o in outs) / max(global_masked, 1.0),
            "num_masked": sum(o["num_masked"] for o in outs),
            "num_unmasked": sum(o["num_unmasked"] for o in outs),
            "audio_samples": sum(float(b["lengths"].sum()) for b in micro),
            "utterances": sum(len(b["keys"]) for b in micro),
            "steps": 1.0 / world}
    for spec in specs:
        for kind in ("masked", "unmasked"):
            sums[f"correct_{kind}/{spec.name}"] = sum(o[f"correct_{kind}/{spec.name}"] for o in outs)
    return sums


def _metrics(totals, specs, lr, engine, elapsed, data_wait, world) -> dict:
    steps = max(totals["steps"], 1e-9)
    metrics = {
        "loss": totals["loss_sum"] / steps,  # per-step loss, already normalized by N
        "lr": lr,
        "num_masked": totals["num_masked"] / steps,
        "audio_s_per_s": totals["audio_samples"] / 16000 / max(elapsed, 1e-9),
        "samples_per_s": totals["utterances"] / max(elapsed, 1e-9),
        "step_time_s": elapsed / steps,
        "data_wait_s": data_wait / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics["grad_norm"] = float(norm)
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    if isinstance(scale, (int, float)):
        metrics["loss_scale"] = float(scale)
    if torch.cuda.is_available():
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for spec in specs:
        metrics[f"acc_masked/{spec.name}"] = totals[f"correct_masked/{spec.name}"] / max(totals["num_masked"], 1)
        metrics[f"acc_unmasked/{spec.name}"] = totals[f"correct_unmasked/{spec.name}"] / max(totals["num_unmasked"], 1)
    if specs:
        metrics["acc_masked"] = metrics[f"acc_masked/{specs[0].name}"]
    return metrics


@torch.no_grad()
def _validate(cfg: TrainConfig, engine, model, specs, dist, dtype) -> dict:
    """``valid_batches`` batches on every rank (an endless loader, so all ranks do the same
    number of forward passes), fixed masks, sums over ranks."""
    from pretrain.config.data import DataConfig

    valid_cfg = DataConfig(**{**asdict(cfg.data), "shards": cfg.valid_shards, "infinite": True,
                              "shuffle": False, "num_workers": 0})
    loader = ShardLoader(valid_cfg, rank=dist.rank, world_size=dist.world_size)
    engine.eval()
    sums = {"loss_sum": 0.0, "num_masked": 0.0, "correct": 0.0}
    for i, batch in zip(range(cfg.valid_batches), loader):
        mask = model.draw_mask(batch["lengths"], batch["audio"].shape[1], batch["labels"],
                               np.random.default_rng([cfg.seed, 0, dist.rank, i]))
        out = engine(batch["audio"].to(engine.device, dtype), batch["lengths"].to(engine.device),
                     {k: v.to(engine.device) for k, v in batch["labels"].items()}, mask=mask)
        sums["loss_sum"] += float(out["loss_sum"])
        sums["num_masked"] += out["num_masked"]
        sums["correct"] += out[f"correct_masked/{specs[0].name}"]
    engine.train()
    loss_sum, masked, correct = dist_engine.all_reduce_sum([sums["loss_sum"], sums["num_masked"], sums["correct"]])
    return {"loss": loss_sum / max(masked, 1), "acc_masked": correct / max(masked, 1)}
