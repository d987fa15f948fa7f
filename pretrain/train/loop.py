"""``pretrain train``: HuBERT masked prediction with DeepSpeed, read top to bottom.

One optimizer step = ``grad_accum`` micro-batches on every rank. Before any forward pass the
span masks of all micro-batches are drawn (from ``(seed, step, rank, micro)``, so a resumed run
masks identically) and the masked frames are counted and summed over ranks: that global count
``N`` normalizes the loss, so the gradient is the same however a batch is split over ranks.
DeepSpeed divides each backward by ``grad_accum`` and averages gradients over ranks, hence the
``world_size * grad_accum / N`` factor below.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pretrain.config import write_run_record
from pretrain.config.core import refuse_foreign_record
from pretrain.config.data import DataConfig, MixingConfig
from pretrain.config.train import TrainConfig
from pretrain.data import flac
from pretrain.data.pipeline import ShardLoader
from pretrain.distributed import read_env, requeue_slurm_job, slurm_job_id, slurm_restart_count
from pretrain.distributed import engine as dist_engine
from pretrain.frames import conv_num_frames
from pretrain.lifecycle import RunLock, StallWatchdog, Stop
from pretrain.model.checkpoint import build_model, load_model, resolve_model_file, save_model
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.train.probes import ProbeScheduler
from pretrain.train.checkpoint import (CheckpointManager, check_resumable, config_hash, rng_state, set_rng_state,
                                       shape_record)
from pretrain.train.faults import Faults
from pretrain.train.metrics import MetricsLogger
from pretrain.train.objectives import Objective, objective_for
from pretrain.train.schedule import learning_rate
from pretrain.utils import PretrainError

log = logging.getLogger(__name__)


def init_backbone(model: HubertPretrain, path: str) -> str:
    """Copy the backbone of the model at ``path`` into ``model``; a clear error naming the
    differing ``model`` fields when the shapes do not fit. Returns the file it read."""
    file = resolve_model_file(path)
    source = load_model(file)
    mine, theirs = model.backbone.state_dict(), source.backbone.state_dict()
    misfit = sorted(set(mine) ^ set(theirs)) + sorted(k for k in set(mine) & set(theirs)
                                                       if mine[k].shape != theirs[k].shape)
    if misfit:
        fields = [f"model.{k}: {v!r} (init_from) vs {getattr(model.cfg, k)!r}"
                  for k, v in asdict(source.cfg).items() if getattr(model.cfg, k) != v]
        raise PretrainError(f"init_from {file}: its backbone does not fit this model config "
                            f"({', '.join(misfit[:3])}); fields that differ: {'; '.join(fields)}")
    model.backbone.load_state_dict(theirs, strict=True)
    return str(file)


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
    """Train until ``cfg.optim.max_steps``; returns the last logged metrics. ``fault`` is for
    tests only (``pretrain.train.faults``)."""
    # Normally installed before the heavy imports (pretrain.cli); here for other in-process callers.
    Stop.install()
    dist = read_env()
    run_dir = Path(cfg.run_dir)
    lock = None
    if dist.is_main:
        # Before anything is written; the other ranks are stopped by the launcher (torchrun,
        # srun --kill-on-bad-exit) when this one exits with the error.
        refuse_foreign_record(run_dir)
        lock = RunLock(run_dir, "pretrain train").acquire()
    try:
        with contextlib.ExitStack() as cleanup:
            return _train(cfg, argv, Faults(fault, dist.rank), dist, run_dir, cleanup)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, argv: list[str] | None, faults: Faults, dist, run_dir: Path,
           cleanup: contextlib.ExitStack) -> dict:
    watchdog = StallWatchdog(run_dir, dist.rank, cfg.stall_timeout, cfg.startup_timeout).start()
    cleanup.callback(watchdog.stop)
    dist_engine.init_process_group(dist, cfg.collective_timeout)
    if dist.is_main:
        write_run_record(run_dir, cfg, argv)
    dist_engine.barrier()

    loader = ShardLoader(cfg.data, rank=dist.rank, world_size=dist.world_size)
    if dist.is_main:
        log.info("FLAC decoding: %s", flac.describe())
    specs = [LabelSpec(ls.name, ls.num_classes, ls.label_rate) for ls in loader.label_sets]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]
    checkpoints = CheckpointManager(run_dir / "checkpoints", dist, cfg.checkpoint.keep_last, cfg.checkpoint.pin,
                                    crash=faults.crash_save, start_over=cfg.checkpoint.start_over)
    model, engine, objective, step = _build(cfg, dist, specs, loader, checkpoints)

    logger = MetricsLogger(run_dir, cfg.log, config=asdict(cfg), enabled=dist.is_main)
    probes = ProbeScheduler(cfg, run_dir, enabled=dist.is_main, slurm_job=slurm_job_id())
    # Closed on the way out, error or not, which stops the data workers there and then.
    # Otherwise a failure (a peer node gone, say) leaves them to the traceback's frames, and at
    # exit multiprocessing waits forever for workers that ignore SIGTERM (data.pipeline).
    batches = cleanup.enter_context(contextlib.closing(_batches(loader)))
    window = _Window(specs, objective, dist.world_size)
    bad_steps = 0
    last: dict = {}
    while step < cfg.optim.max_steps:
        lr = learning_rate(step, cfg.optim)
        _set_lr(engine, lr)
        faults.step_start(step)
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.deepspeed.grad_accum)]
        window.data_wait += time.perf_counter() - t0
        masks = [model.draw_mask(b["lengths"], b["audio"].shape[1], b["labels"],
                                 np.random.default_rng([cfg.seed, step, dist.rank, i]))
                 for i, b in enumerate(micro)]
        inject_nan, step_fault = faults.in_step(step)
        outs, skipped, global_masked = forward_backward(engine, micro, masks, dist.world_size, dtype, inject_nan,
                                                        step_fault, extras=objective.forward_extras(step, dist.rank))
        if skipped:
            # The update is taken at learning rate 0: AdamW (decoupled decay included) then
            # leaves every parameter exactly as it was, on every rank.
            _set_lr(engine, 0.0)
        applied = dist_engine.optimizer_step(engine)
        step += 1
        watchdog.beat()
        objective.after_step(model, step)
        bad_steps = _bad_steps(cfg, step, bad_steps, skipped, applied, window)
        window.add(outs, micro, global_masked)
        if step % cfg.log.every == 0 or step == cfg.optim.max_steps:
            last = window.flush(step, lr, engine)
            logger.log(step, last)
            if dist.is_main:
                probes.collect(logger)
        if cfg.valid_shards and step % cfg.valid_every == 0:
            logger.log(step, _validate(cfg, engine, model, specs, dist, dtype), prefix="valid_")

        # All ranks agree on a stop signal (it may reach only some of them, or reach them at
        # different steps), so that they checkpoint the same step together.
        usr1, term = (v > 0 for v in dist_engine.all_reduce_sum([float(Stop.usr1), float(Stop.term)]))
        preempted = usr1 or term
        if step % cfg.checkpoint.every == 0 or step == cfg.optim.max_steps or preempted:
            faults.before_save(step)
            rank_state = {"step": step, "data": loader.state_dict(), "rng": rng_state()}
            weights = dist_engine.full_state_dict(engine)  # every rank: a collective under ZeRO 3
            checkpoints.save(engine, step, rank_state, config_hash(cfg),
                             model_file=lambda path: save_model(path, model, weights, **objective.model_file_extras()),
                             meta=shape_record(cfg, specs))
            if step == cfg.optim.max_steps and cfg.log.wandb_artifacts:
                logger.log_checkpoint(run_dir / "checkpoints" / f"step_{step}")
            faults.before_probe(step)
            if dist.is_main and probes.due(step):
                probes.start(step, run_dir / "checkpoints" / f"step_{step}")
            if faults.exit_after_save(step):
                logger.close()
                dist_engine.shutdown()
        if preempted and step < cfg.optim.max_steps:
            logger.close()
            return {**last, "preempted_at": step, "exit_code": handle_preemption(step, cfg, dist, term=term)}
    watchdog.stop()  # the probes' bounded wait below is not a step
    if dist.is_main:
        probes.finish(logger)
    logger.close()
    Stop.restore()
    return last


def _build(cfg: TrainConfig, dist, specs: list[LabelSpec], loader: ShardLoader,
           checkpoints: CheckpointManager) -> tuple[HubertPretrain, object, Objective, int]:
    """The model, its DeepSpeed engine, the objective and the step to start from: a new run
    (initialized from ``init_from`` when set), or the newest checkpoint resumed exactly."""
    resume = checkpoints.find_resume()
    universal = False
    if resume is not None:
        check_resumable(checkpoints.manifest(resume), cfg, specs, resume)
        universal = checkpoints.prepare_load(resume, cfg.deepspeed.zero_stage)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, specs)
    if resume is None and cfg.init_from is not None:
        source = init_backbone(model, cfg.init_from)
        if dist.is_main:
            log.info("new run: backbone from %s; label embeddings and final_proj initialized fresh", source)
    objective = objective_for(cfg)
    objective.prepare(model, None if resume is None else checkpoints.root / f"step_{resume}")
    if cfg.model.compile:  # after the objective's copies (a teacher), which are never compiled
        compile_layers(model)
    engine = dist_engine.build_engine(model, cfg, load_universal=universal)
    objective.to(engine.device)
    if resume is None:
        return model, engine, objective, 0
    own, everyone = checkpoints.load(engine, resume, universal)
    if checkpoints.manifest(resume)["world_size"] == dist.world_size:
        loader.load_state_dict(own["data"])
    else:
        loader.load_repartitioned([state["data"] for state in everyone])
    if own is not None:
        set_rng_state(own["rng"])
    fingerprint = dist_engine.state_fingerprint(engine)  # a collective: every rank
    if dist.is_main:
        log.info("resumed from step %d: %s", everyone[0]["step"], json.dumps(fingerprint))
    return model, engine, objective, everyone[0]["step"]


def _set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _bad_steps(cfg: TrainConfig, step: int, in_a_row: int, skipped: bool, applied: bool, window: "_Window") -> int:
    """Steps in a row whose loss or gradient was non-finite somewhere, after ``step``; stops
    training at ``max_bad_steps``."""
    if not (skipped or not applied):
        return 0
    in_a_row += 1
    window.skipped_total += 1
    what = "loss" if skipped else "gradient"
    log.warning("step %d: non-finite %s on some rank; no rank changed its parameters "
                "(%d such steps in a row)", step, what, in_a_row)
    # fp16's dynamic loss scaling skips overflowing steps by design while it lowers the
    # scale; DeepSpeed itself stops when the scale cannot go lower.
    if in_a_row >= cfg.max_bad_steps and (skipped or cfg.deepspeed.precision != "fp16"):
        raise PretrainError(f"{in_a_row} consecutive steps with a non-finite {what} "
                            "(max_bad_steps); stopping. Lower the learning rate or check the data.")
    return in_a_row


class _Window:
    """The sums of one logging window, turned into metrics over every rank at its end."""

    def __init__(self, specs: list[LabelSpec], objective: Objective, world_size: int):
        self.specs, self.objective, self.world_size = specs, objective, world_size
        self.skipped_total = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add(self, outs: list[dict], micro: list[dict], global_masked: float) -> None:
        for k, v in _local_sums(outs, micro, self.specs, global_masked, self.world_size).items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        step_arrays = {f"{kind}/{spec.name}": sum(o[f"{kind}_hist/{spec.name}"].numpy() for o in outs)
                       for spec in self.specs for kind in ("pred", "target")}
        step_arrays.update(self.objective.sums(outs))
        for k, v in step_arrays.items():
            self.arrays[k] = self.arrays.get(k, 0) + v

    def flush(self, step: int, lr: float, engine) -> dict:
        keys = sorted(self.sums)
        totals = dict(zip(keys, dist_engine.all_reduce_sum([self.sums[k] for k in keys])))
        array_keys = sorted(self.arrays)
        flat = dist_engine.all_reduce_sum(np.concatenate([self.arrays[k] for k in array_keys]).tolist())
        sizes = np.cumsum([0] + [len(self.arrays[k]) for k in array_keys])
        arrays = {k: np.asarray(flat[a:b]) for k, a, b in zip(array_keys, sizes[:-1], sizes[1:])}
        metrics = _metrics(totals, self.specs, lr, engine, time.perf_counter() - self.start, self.data_wait,
                           self.world_size)
        metrics.update(self.objective.metrics(step, arrays, totals["num_masked"]))
        metrics.update(usage_perplexity({k: v for k, v in arrays.items()
                                         if k.split("/", 1)[0] in ("pred", "target")}))
        metrics["skipped_steps"] = self.skipped_total
        self._reset()
        return metrics


def compile_layers(model: HubertPretrain) -> None:
    """``model.compile``: compile each encoder layer in place (``nn.Module.compile``), so the
    parameter names, and so checkpoints and exports, stay those of the eager model. Layers, not
    the whole model: the masking and the loss index with data-dependent shapes, which would
    split the graph anyway, and one layer's graph is reused by all of them. Lengths vary from
    batch to batch, so the time axis is compiled as dynamic from the start."""
    for layer in model.backbone.encoder.layers:
        layer.compile(dynamic=True)


def handle_preemption(step: int, cfg: TrainConfig, dist, term: bool = False) -> int:
    """After the checkpoint a stop signal asked for: under SLURM, after SIGUSR1, rank 0
    requeues the job (same id; SLURM stops the tasks and restarts the job, which resumes from
    the checkpoint), unless ``max_requeues`` is spent. Returns the exit status for every rank:
    0 when requeued (the job is already back in the queue), 75 (EX_TEMPFAIL) outside SLURM
    (relaunch to resume) and after SIGTERM (whoever sent it, ``scontrol requeue`` or
    ``scancel``, has decided what happens to the job), 1 when the requeue budget is spent (the
    job ends FAILED, never COMPLETED)."""
    job = slurm_job_id()
    restarts = slurm_restart_count()
    code = 0
    if term:
        code = 75
        if dist.is_main:
            log.warning("stopped by SIGTERM at step %d: checkpoint saved; relaunching the same command (or "
                        "the requeued job) resumes from it", step)
    elif job is None:
        code = 75
        if dist.is_main:
            log.warning("preempted at step %d: checkpoint saved; not under SLURM, so relaunch the same "
                        "command to resume", step)
    elif restarts >= cfg.max_requeues:
        code = 1
        if dist.is_main:
            log.error("preempted at step %d: checkpoint saved, but the job was already requeued %d times "
                      "(max_requeues=%d); not requeueing. Submit it again (or raise max_requeues) to "
                      "resume from %s", step, restarts, cfg.max_requeues, cfg.run_dir)
    elif dist.is_main:
        log.warning("preempted at step %d: checkpoint saved; requeueing SLURM job %s (restart %d of at most %d)",
                    step, job, restarts + 1, cfg.max_requeues)
        requeue_slurm_job(job)
    dist_engine.barrier()
    return code


def forward_backward(engine, micro: list[dict], masks: list[torch.Tensor], world_size: int,
                     dtype: torch.dtype, inject_nan: bool = False, fault: dict | None = None,
                     extras: dict | None = None) -> tuple[list[dict], bool, float]:
    """Forward and backward of this rank's micro-batches of one optimizer step.

    Returns the model outputs, whether some rank's loss was non-finite (then every rank ran a
    zero backward instead) and the global masked-frame count ``N``. The gradient DeepSpeed
    ends up with is ``sum over ranks and micro-batches of grad(loss_sum) / N``; the feature
    penalty is scaled by the global masked/unpadded frame ratio for the same reason.
    ``fault`` (tests): ``{"kill": True}`` SIGKILLs this process between a forward and its
    backward; ``{"nan_grad": True}`` makes one parameter's gradient NaN. ``extras``: the
    objective's keyword arguments of every forward (data2vec's teacher).
    """
    fault = fault or {}
    ga = len(micro)
    local_masked = float(sum(int(m.sum()) for m in masks))
    local_frames = float(sum(conv_num_frames(int(n)) for b in micro for n in b["lengths"]))
    global_masked, global_frames = dist_engine.all_reduce_sum([local_masked, local_frames])
    scale = world_size * ga / max(global_masked, 1.0)
    pen_scale = global_masked / max(global_frames, 1.0)
    hook = None
    if fault.get("nan_grad"):
        first = next(p for p in engine.module.parameters() if p.requires_grad)
        hook = first.register_hook(lambda g: g * float("nan"))
    outs, skipped = [], False
    for batch, mask in zip(micro, masks):
        audio = batch["audio"].to(engine.device, dtype)
        targets = {k: v.to(engine.device) for k, v in batch["labels"].items()}
        out = engine(audio, batch["lengths"].to(engine.device), targets, mask=mask, feature_pen_scale=pen_scale,
                     **(extras or {}))
        if fault.get("kill"):
            log.warning("test fault: killing this rank mid-step")
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.get("raise"):
            raise RuntimeError("test fault: an error in the forward pass")
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
        # DeepSpeed's own counter would put the accumulation boundary at every grad_accum-th
        # engine.step() call, i.e. update every grad_accum optimizer steps; we call step() once
        # per optimizer step, so the boundary is set explicitly: the last micro-batch.
        engine.set_gradient_accumulation_boundary(len(outs) == ga)
        engine.backward(loss)
    if hook is not None:
        hook.remove()
    return outs, skipped, global_masked


def usage_perplexity(hists: dict[str, np.ndarray]) -> dict[str, float]:
    """exp(entropy) of each label histogram: the number of classes in effective use, among the
    masked frames' targets (``usage_ppl_target/NAME``) and the model's predictions
    (``usage_ppl_pred/NAME``; far below the target's means the predictions collapsed)."""
    metrics = {}
    for key, counts in hists.items():
        total = counts.sum()
        if total <= 0:
            continue
        p = counts[counts > 0] / total
        kind, name = key.split("/", 1)
        metrics[f"usage_ppl_{kind}/{name}"] = float(np.exp(-(p * np.log(p)).sum()))
    return metrics


def _local_sums(outs, micro, specs, global_masked, world) -> dict[str, float]:
    sums = {"loss_sum": sum(float(o["loss_sum"].detach()) for o in outs) / max(global_masked, 1.0),
            "num_masked": sum(o["num_masked"] for o in outs),
            "num_unmasked": sum(o["num_unmasked"] for o in outs),
            "audio_samples": sum(float(b["lengths"].sum()) for b in micro),
            # What the model computed on, padding included (batch x longest row): the "nominal"
            # figure some toolkits report; the gap to audio_samples is what bucketing wastes.
            "padded_samples": sum(float(b["audio"].shape[0] * b["audio"].shape[1]) for b in micro),
            "utterances": sum(len(b["keys"]) for b in micro),
            # WavLM mixing, per row: 1 speech, 2 noise mixed in (the data workers decide)
            "mixed_speech": sum(int((b["mixing"] == 1).sum()) for b in micro),
            "mixed_noise": sum(int((b["mixing"] == 2).sum()) for b in micro),
            "decode_restarts": sum(b["decode_restarts"] for b in micro),
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
        "padded_audio_s_per_s": totals["padded_samples"] / 16000 / max(elapsed, 1e-9),
        "samples_per_s": totals["utterances"] / max(elapsed, 1e-9),
        "step_time_s": elapsed / steps,
        "data_wait_s": data_wait / steps,
        "mixed_speech_frac": totals["mixed_speech"] / max(totals["utterances"], 1),
        "mixed_noise_frac": totals["mixed_noise"] / max(totals["utterances"], 1),
        "decode_restarts": totals["decode_restarts"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # DeepSpeed's own count of optimizer steps: equal to `step` when every step reaches
        # its accumulation boundary (skipped non-finite steps count too).
        "optimizer_updates": int(engine.global_steps),
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
    number of forward passes), fixed masks, sums over ranks, clean audio (no mixing)."""
    valid_cfg = DataConfig(**{**asdict(cfg.data), "shards": cfg.valid_shards, "infinite": True,
                              "shuffle": False, "num_workers": 0, "mixing": MixingConfig()})
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
