"""What an ``iterate`` run adds to the dashboards of its trainings once an iteration's
evaluations are done: the quality of its labels (PNMI, phone and cluster purity: on the
training shards, held out, and MFCC's at the same k) and its probe table.

Each goes into the iteration's own training run: to wandb as tables and as scalars on an
``iteration`` axis (the training run is resumed by its id, so the numbers sit in the same run,
in the same group, as its curves; wandb only takes increasing steps, hence the axis), and to
TensorBoard as scalars at the training's last step. The report's plots go to the last
iteration's run as images, and with ``log.wandb_artifacts`` the iteration's k-means centroids go
to its run as an artifact (type ``kmeans``). What was logged is recorded in ``it<i>/train/dashboard.json``, so
that rerunning ``iterate`` (or the SLURM job that ends a chain) logs nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import yaml

from pretrain.config.probe import METRICS
from pretrain.probe.results import read_probe, table_rows
from pretrain.train.metrics import log_artifact, wandb_mode
from pretrain.utils import atomic_write_json

log = logging.getLogger(__name__)

QUALITY = {"quality": "train", "heldout": "heldout", "mfcc_heldout": "mfcc_heldout"}
"""``it<i>/<folder>/quality.json`` -> the name its numbers are logged under."""
SCORES = ("pnmi", "phone_purity", "cluster_purity", "usage_perplexity")


def evaluations(run: Path, i: int) -> dict:
    """Iteration ``i``'s label quality (``{name: {score: value}}``) and probe record."""
    found: dict = {"quality": {}, "probe": None}
    for folder, name in QUALITY.items():
        path = run / f"it{i}" / folder / "quality.json"
        if path.is_file():
            q = json.loads(path.read_text())
            found["quality"][name] = {s: float(q[s]) for s in SCORES if q.get(s) is not None}
    if (run / f"it{i}" / "probe" / "probe.json").is_file():
        found["probe"] = read_probe(run / f"it{i}" / "probe")
    return found


def scalars(found: dict) -> dict[str, float]:
    out = {f"labels/{name}/{s}": v for name, q in found["quality"].items() for s, v in q.items()}
    probe = found["probe"]
    if probe is not None:
        for metric, best in probe["best"].get("model", {}).items():
            out[f"probe/best/{metric}"] = float(best["value"])
            out[f"probe/best_layer/{metric}"] = float(best["layer"])
    return out


def publish(run: Path, iterations: int) -> None:
    """Every iteration's evaluations to its training's dashboards, the report's plots with the
    last one's. A dashboard that fails is a warning: the run and its report stand."""
    for i in range(1, iterations + 1):
        images = sorted((run / "report").glob("*.png")) if i == iterations else None
        try:
            log_iteration(run, i, images)
        except Exception as e:  # noqa: BLE001 - see above
            log.warning("iteration %d: its evaluations did not reach the dashboards: %s: %s", i,
                        type(e).__name__, e)


def log_iteration(run: Path, i: int, images: list[Path] | None = None) -> bool:
    """Log iteration ``i``'s evaluations (and ``images``) to its training's dashboards, unless
    exactly this was logged before; returns whether anything was logged."""
    train = run / f"it{i}" / "train"
    config = train / "config.yaml"
    if not config.is_file() or not (train / "checkpoints" / "latest").is_file():
        return False
    found = evaluations(run, i)
    values = scalars(found)
    if not values and not images:
        return False
    images = [p for p in (images or []) if p.is_file()]
    cfg = yaml.safe_load(config.read_text())
    kmeans = run / f"it{i}" / "kmeans"
    centroids = None
    if cfg["log"].get("wandb_artifacts") and (kmeans / "kmeans.json").is_file():
        centroids = json.loads((kmeans / "kmeans.json").read_text())["centroids_sha256"]
    digest = hashlib.sha256(json.dumps([values, [hashlib.sha256(p.read_bytes()).hexdigest() for p in images],
                                        centroids], sort_keys=True).encode()).hexdigest()
    marker = train / "dashboard.json"
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
        return False
    step = int((train / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    if cfg["log"].get("tensorboard", True):
        _tensorboard(train, values, step)
    if cfg["log"].get("wandb", "auto") != "disabled" and (train / "wandb_id").is_file():
        _wandb(train, cfg, found, values, i, images, kmeans if centroids else None)
    atomic_write_json(marker, {"sha256": digest, "step": step, "scalars": values,
                               "images": [str(p) for p in images], "centroids_sha256": centroids})
    return True


def _tensorboard(train: Path, values: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter  # here: only when a run logs to TensorBoard

    writer = SummaryWriter(str(train / "tensorboard"))
    for key, value in values.items():
        writer.add_scalar(key, value, step)
    writer.close()


def _wandb(train: Path, cfg: dict, found: dict, values: dict[str, float], i: int, images: list[Path],
           kmeans: Path | None) -> None:
    import wandb  # here: only when the run logs to wandb

    run_id = (train / "wandb_id").read_text().strip()
    mode = wandb_mode(cfg["log"].get("wandb", "auto"))  # the training's own rule
    try:
        run = wandb.init(project=cfg["log"].get("wandb_project", "pretrain"), id=run_id, resume="allow",
                         mode=mode, dir=str(train), group=cfg["log"].get("wandb_group"),
                         name=cfg["log"].get("wandb_name"), tags=cfg["log"].get("wandb_tags") or None,
                         job_type=cfg["log"].get("wandb_job_type", "train"))
    except Exception as e:  # noqa: BLE001 - a dashboard must never fail a finished run
        log.warning("iteration %d: wandb unavailable (%s); its evaluations are in TensorBoard and report.md", i, e)
        return
    try:
        run.define_metric("iteration")
        for prefix in ("labels/*", "probe/*"):
            run.define_metric(prefix, step_metric="iteration")
        logged: dict = {"iteration": i, **values}
        if found["quality"]:
            logged["label_quality"] = wandb.Table(
                columns=["labels", *SCORES],
                data=[[name, *(q.get(s) for s in SCORES)] for name, q in found["quality"].items()])
        if found["probe"] is not None:
            metrics = list(METRICS)
            logged["probes"] = wandb.Table(
                columns=["features", *metrics],
                data=[[label, *(v.get(m) for m in metrics)] for label, v in table_rows(found["probe"])])
        for path in images:
            logged[f"report/{path.stem}"] = wandb.Image(str(path))
        run.log(logged)
        if kmeans is not None:
            record = json.loads((kmeans / "kmeans.json").read_text())
            log_artifact(run, f"kmeans-{run_id}", "kmeans", [kmeans / "centroids.npy", kmeans / "kmeans.json"],
                         metadata={"iteration": i, "k": int(record["k"]), "features": record["spec"],
                                   "centroids_sha256": record["centroids_sha256"]},
                         aliases=["latest", f"it{i}"])
    finally:
        run.finish()
