"""``pretrain iterate``: the iterative HuBERT pipeline as one restartable command.

The run is a fixed list of stages (``plan``), each a ``pretrain`` command line whose outputs
live under ``run_dir``::

    corpus        corpus synth        -> run_dir/corpus            (synth_hours only)
    shards        shards build        -> run_dir/shards            (unless corpus.shards)
    it<i>.features features mfcc|model -> run_dir/it<i>/features    (model: it<i-1>'s last checkpoint)
    it<i>.kmeans  kmeans fit          -> run_dir/it<i>/kmeans
    it<i>.labels  kmeans assign       -> SHARDS/labels/it<i>_km<k>
    it<i>.quality kmeans quality      -> run_dir/it<i>/quality     (when phone references exist)
    it<i>.heldout kmeans quality      -> run_dir/it<i>/heldout     (with eval: the k-means scored on held-out
                                                                    shards; it<i>.mfcc_kmeans/.mfcc_heldout
                                                                    an MFCC k-means at iteration i's k)
    it<i>.train   train               -> run_dir/it<i>/train
    it<i>.probe   probe               -> run_dir/it<i>/probe       (with eval: held-out probes)
    export        export hf           -> run_dir/hf

With ``eval``, ``eval.corpus`` and ``eval.shards`` make the held-out evaluation shards (or
``eval.shards`` names existing ones), and ``layer: auto`` makes ``it<i>.features`` read the
layer from ``it<i-1>.probe``'s ``probe.json`` when it runs.

Bookkeeping, in ``run_dir/stages/<name>.json``: a stage's *fingerprint* is the sha256 of its
resolved config and of its upstream stages' fingerprints. Paths inside the run directory enter
fingerprints and records relative to it (``${run_dir}/it1/kmeans``), so a run directory can be
moved and resumed with nothing recomputed, and a copy is a run of its own. The record is
written when the stage starts; the stage is *done* when its outputs are complete (each stage's
own completion mark, always the last file written: ``corpus.json``, ``manifest.json``,
``meta.json`` whose provenance names this iteration's centroids, ``kmeans.json`` whose centroid
sha256 matches ``centroids.npy``, ``quality.json``, the last checkpoint, ``config.json``). On a
rerun a done stage with the same fingerprint is skipped; an unfinished one is run again and
resumes by itself (shards, features and labels are idempotent per shard, training resumes from
its newest checkpoint); a stage whose fingerprint changed is invalidated together with
everything downstream (its outputs are deleted, but never anything outside the run directory
other than a label set this run owns), and the run says which fields changed.

Identity: ``stages/identity.json`` holds the run's id and where it was created. Label sets of a
run whose shards live outside it (``corpus.shards``) carry the id in their name
(``it2_km500-<id>``), so runs sharing a shard directory never overwrite each other's labels.
A run found at a new path whose old path still holds the same id is a copy and gets an id of
its own (its external label sets are then made afresh); one whose old path is gone was moved.

Locally every stage runs as a subprocess (training through ``launch local --nproc``); under
SLURM (``launch slurm iterate``) each stage is a job running ``pretrain iterate --only NAME``,
chained with ``afterok``; both go through ``run_stage``. ``report.md`` is rewritten at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from pretrain.config import quote_override
from pretrain.config.core import HOW_NOT_WHAT, refuse_foreign_record
from pretrain.config.iterate import IterateConfig
from pretrain.config.model import Data2VecConfig
from pretrain.resources import config_path
from pretrain.utils import PretrainError, atomic_write_json, redact

log = logging.getLogger(__name__)

STAGES_DIR = "stages"

ADDED_FIELDS = {"stretch": 1.0, "checkpoint.start_over": False,
                **{f"shards build:{k}": v for k, v in (
                    ("speaker_from", None), ("transcripts", True), ("side_json", True), ("max_duration", None),
                    ("long_policy", "split"), ("subset", "all"), ("valid_fraction", 0.0), ("split_by", "speaker"),
                    ("split_seed", 0))},
                "features model:chunk_seconds": 30.0, "features model:chunk_context": 5.0,
                "model.checkpoint_activations": False, "model.compile": False, "model.objective": "hubert",
                "model.conv_pos_depth": 1,
                "model.data2vec": dataclasses.asdict(Data2VecConfig())}
"""Stage config fields added later (dotted for nested ones; ``COMMAND:field`` for one stage
command's only), with the value runs made before them had."""
RUN_DIR = "${run_dir}"
"""How the run directory is written in fingerprints and records."""


@dataclass
class PlannedStage:
    name: str
    argv: list[str]
    """The ``pretrain`` command line (without ``pretrain``)."""
    outputs: list[Path]
    """What invalidation deletes (all under run_dir or a label set of ours)."""
    done_mark: Path
    """Exists when the stage has finished."""
    upstream: list[str]
    train: bool = False
    array: bool = False
    """Shards split over array tasks under SLURM."""
    done_check: str | Callable[[], bool] | None = None
    """For training: the text ``checkpoints/latest`` must hold; else a test of the outputs
    beyond the mark's existence (a label set's provenance, a centroid file's sha256)."""
    fingerprint: str = ""
    legacy_fingerprint: str = ""
    """The fingerprint as runs made before relative paths computed it (absolute paths), so
    that their records are carried over instead of invalidated."""
    config: dict = field(default_factory=dict)

    def done(self) -> bool:
        if not self.done_mark.exists():
            return False
        if callable(self.done_check):
            return self.done_check()
        return self.done_check is None or self.done_mark.read_text().strip() == self.done_check


def shards_dir(cfg: IterateConfig) -> Path:
    return Path(cfg.corpus.shards) if cfg.corpus.shards else Path(cfg.run_dir) / "shards"


def label_name(i: int, k: int, run_id: str = "") -> str:
    """Iteration ``i``'s label set; ``run_id`` (for shards outside the run) makes it this run's."""
    return f"it{i}_km{k}" + (f"-{run_id}" if run_id else "")


IDENTITY = "identity.json"


def run_identity(run: Path, create: bool = True) -> str:
    """This run's id (see the module docstring); ``create=False`` (a dry run) writes nothing.

    A run directory made before ids existed (stage records but no identity) keeps the empty
    id, and so its label set names."""
    run = run.resolve()
    path = run / STAGES_DIR / IDENTITY
    if path.is_file():
        identity = json.loads(path.read_text())
        if identity["path"] == str(run):
            return identity["run_id"]
        old = Path(identity["path"]) / STAGES_DIR / IDENTITY
        try:
            copied = json.loads(old.read_text())["run_id"] == identity["run_id"]
        except (OSError, ValueError, KeyError):
            copied = False
        if not copied:  # moved: the same run
            log.info("run directory moved from %s to %s", identity["path"], run)
            if create:
                atomic_write_json(path, {**identity, "path": str(run)})
            return identity["run_id"]
        log.warning("run directory %s is a copy of %s: it is a run of its own from here on (new id)",
                    run, identity["path"])
        fresh = {"run_id": secrets.token_hex(4), "path": str(run), "copied_from": identity["path"]}
    elif (run / STAGES_DIR).is_dir() and any((run / STAGES_DIR).glob("*.json")):
        fresh = {"run_id": "", "path": str(run), "note": "made before run ids: label sets keep their names"}
    else:
        fresh = {"run_id": secrets.token_hex(4), "path": str(run)}
    if create:
        atomic_write_json(path, {**fresh, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return fresh["run_id"]


def _inside(path: Path, run: Path) -> bool:
    return path.resolve().is_relative_to(run.resolve())


def _relative(value, run: str):
    """``value`` with every path inside ``run`` written as ``${run_dir}/...``."""
    if isinstance(value, dict):
        return {k: _relative(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, run) for v in value]
    if isinstance(value, str) and (value == run or value.startswith(run + os.sep)):
        return RUN_DIR + value[len(run):]
    return value


def _absolute(path: str, run: Path) -> Path:
    return run / path[len(RUN_DIR) + 1:] if path.startswith(RUN_DIR) else Path(path)


def _labels_done(meta: Path, kmeans: Path) -> Callable[[], bool]:
    """A label set is this iteration's only if its provenance names these centroids: another
    run (or an earlier k-means) may have written a set of the same name."""
    def check() -> bool:
        try:
            made = json.loads(meta.read_text())["provenance"]["centroids_sha256"]
            return made == json.loads((kmeans / "kmeans.json").read_text())["centroids_sha256"]
        except (OSError, ValueError, KeyError):
            return False
    return check


def _kmeans_done(folder: Path) -> Callable[[], bool]:
    def check() -> bool:
        from pretrain.utils import sha256_file

        try:
            return json.loads((folder / "kmeans.json").read_text())["centroids_sha256"] == \
                sha256_file(folder / "centroids.npy")
        except (OSError, ValueError, KeyError):
            return False
    return check


def _reference(cfg: IterateConfig, rate: int) -> str | None:
    if cfg.reference is None:
        return None
    if cfg.reference != "auto":
        return cfg.reference
    name = f"phones{rate}"
    manifest = shards_dir(cfg) / "manifest.json"
    if manifest.is_file():
        return name if (shards_dir(cfg) / "labels" / name / "meta.json").is_file() else None
    # Not built yet: a synthesized corpus always has phone alignments (and so does an input
    # folder that is one).
    synthetic = cfg.corpus.synth_hours is not None or (
        cfg.corpus.input is not None and (Path(cfg.corpus.input) / "corpus.json").is_file())
    return name if synthetic else None


def _refuse_data2vec(cfg: IterateConfig) -> None:
    """Every iteration here clusters and trains on the labels; data2vec learns from its EMA
    teacher and uses none, so such a run is refused before anything is planned (its own
    validation would otherwise stop it at the training stage, naming data.labels)."""
    files = [OmegaConf.load(config_path(path)) for path in cfg.train_configs]
    for i, it in enumerate(cfg.iterations):
        merged = OmegaConf.merge(*files, OmegaConf.from_dotlist([*cfg.train_overrides, *it.train_overrides]))
        if OmegaConf.select(merged, "model.objective", default="hubert") == "data2vec":
            raise PretrainError(
                f"iterations.{i}: its training has model.objective=data2vec (from train_configs/train_overrides), "
                f"which learns from an EMA teacher without cluster labels, but each iteration of pretrain iterate "
                f"clusters (iterations.{i}.k={it.k}) and trains on the labels; train data2vec with `pretrain "
                "train` (or `launch slurm train`) and data.labels=[]")


def plan(cfg: IterateConfig, create_identity: bool = True) -> list[PlannedStage]:
    """The stages of ``cfg``; ``create_identity=False`` (a dry run) writes nothing."""
    _refuse_data2vec(cfg)
    run = Path(cfg.run_dir).resolve()
    shards = shards_dir(cfg).resolve()
    run_id = "" if _inside(shards, run) else run_identity(run, create_identity)
    stages: list[PlannedStage] = []
    jobs = str(cfg.jobs)
    if cfg.corpus.synth_hours is not None:
        stages.append(PlannedStage("corpus", ["corpus", "synth", "--out", str(run / "corpus"), "--hours",
                                              str(cfg.corpus.synth_hours), "--seed", str(cfg.corpus.synth_seed),
                                              *_synth_options(cfg, cfg.corpus.synth_voices), "--jobs", jobs],
                                   [run / "corpus"], run / "corpus" / "corpus.json", []))
    if cfg.corpus.shards is None:
        source = str(run / "corpus") if cfg.corpus.synth_hours is not None else cfg.corpus.input
        stages.append(PlannedStage("shards", ["shards", "build", "--input", source, "--out", str(shards),
                                              "--per-shard", str(cfg.corpus.per_shard), "--jobs", jobs],
                                   [shards], shards / "manifest.json", [s.name for s in stages]))
    base = [s.name for s in stages if s.name == "shards"]
    eval_shards, eval_up = _eval_stages(cfg, run, stages, jobs)
    previous_train: PlannedStage | None = None
    previous_probe: PlannedStage | None = None
    for i, it in enumerate(cfg.iterations, start=1):
        d = run / f"it{i}"
        name = label_name(i, it.k, run_id)
        sample = ["--shards", str(shards), "--out", str(d / "features"), "--fraction", str(it.fraction),
                  "--max-frames", str(it.max_frames), "--jobs", jobs]
        if it.features == "mfcc":
            features = PlannedStage(f"it{i}.features", ["features", "mfcc", *sample], [d / "features"],
                                    d / "features" / "meta.json", base, array=True)
        else:
            checkpoint = run / f"it{i - 1}" / "train" / "checkpoints" / f"step_{cfg.iterations[i - 2].max_steps}"
            if it.layer == "auto":  # the layer the previous iteration's probes rank best
                layer = [quote_override("layer_from", str(run / f"it{i - 1}" / "probe" / "probe.json")),
                         f"layer_metric={cfg.eval.probe_metric}"]
                up = [*base, previous_train.name, previous_probe.name]
            else:
                layer, up = ["--layer", it.layer], [*base, previous_train.name]
            features = PlannedStage(f"it{i}.features", ["features", "model", "--checkpoint", str(checkpoint),
                                                        *sample, *layer],
                                    [d / "features"], d / "features" / "meta.json", up, array=True)
        kmeans = PlannedStage(f"it{i}.kmeans", ["kmeans", "fit", "--features", str(d / "features"), "--out",
                                                str(d / "kmeans"), "--k", str(it.k), "--seed", str(it.kmeans_seed)],
                              [d / "kmeans"], d / "kmeans" / "kmeans.json", [features.name],
                              done_check=_kmeans_done(d / "kmeans"))
        # The model the features came from, where it is now (the run may have moved since the
        # k-means recorded its path; its sha256 is checked).
        relocate = [] if it.features == "mfcc" else [quote_override("checkpoint", str(checkpoint))]
        labels = PlannedStage(f"it{i}.labels", ["kmeans", "assign", *relocate, "--kmeans", str(d / "kmeans"),
                                                "--shards", str(shards), "--name", name, "--jobs", jobs],
                              [shards / "labels" / name], shards / "labels" / name / "meta.json",
                              [*base, kmeans.name], array=True,
                              done_check=_labels_done(shards / "labels" / name / "meta.json", d / "kmeans"))
        stages += [features, kmeans, labels]
        reference = _reference(cfg, 100 if it.features == "mfcc" else 50)
        if reference:
            stages.append(PlannedStage(f"it{i}.quality", ["kmeans", "quality", "--shards", str(shards), "--labels",
                                                          name, "--reference", reference, "--out", str(d / "quality")],
                                       [d / "quality"], d / "quality" / "quality.json", [labels.name]))
        if eval_shards is not None and _has_phones50(cfg, eval_shards):
            stages += _heldout_stages(cfg, run, i, it, eval_shards, eval_up, kmeans, relocate)
        train_argv = ["train"]
        for path in cfg.train_configs:
            train_argv += ["--config", str(config_path(path).resolve())]
        train_argv += [*cfg.train_overrides, *it.train_overrides, quote_override("run_dir", str(d / "train")),
                       quote_override("data.shards", str(shards)), f"data.labels=[{name}]",
                       f"optim.max_steps={it.max_steps}"]
        train_up = [labels.name]
        if it.init_from_previous:
            previous = run / f"it{i - 1}" / "train" / "checkpoints" / f"step_{cfg.iterations[i - 2].max_steps}"
            train_argv.append(quote_override("init_from", str(previous)))
            train_up.append(previous_train.name)
        previous_train = PlannedStage(f"it{i}.train", train_argv, [d / "train"],
                                      d / "train" / "checkpoints" / "latest", train_up, train=True,
                                      done_check=f"step_{it.max_steps}")
        stages.append(previous_train)
        if eval_shards is not None:
            # Baselines (MFCC, log-mel, the untrained twin) once, with the first iteration.
            baselines = "mfcc,logmel,untrained" if i == 1 else "none"
            previous_probe = PlannedStage(
                f"it{i}.probe", ["probe", "--checkpoint", str(d / "train" / "checkpoints" / f"step_{it.max_steps}"),
                                 "--eval-shards", str(eval_shards), "--out", str(d / "probe"),
                                 "--probes", cfg.eval.probes, f"baselines={baselines}", *cfg.eval.probe_overrides],
                [d / "probe"], d / "probe" / "probe.json", [previous_train.name, *eval_up])
            stages.append(previous_probe)
    if cfg.export:
        last = run / f"it{len(cfg.iterations)}" / "train" / "checkpoints" / f"step_{cfg.iterations[-1].max_steps}"
        stages.append(PlannedStage("export", ["export", "hf", str(last), str(run / "hf")], [run / "hf"],
                                   run / "hf" / "config.json", [previous_train.name]))
    _fingerprint(stages, run)
    _check_layers(cfg, {s.name: s for s in stages})
    if cfg.export and previous_train is not None \
            and previous_train.config.get("model", {}).get("frontend", "conv") != "conv":
        # Refused here rather than after hours of training, at the export stage.
        raise PretrainError(f"export: the last iteration's model has model.frontend="
                            f"'{previous_train.config['model']['frontend']}', which transformers' HubertModel "
                            "cannot take; set export=false (the checkpoints still work with pretrain)")
    return stages


def _check_layers(cfg: IterateConfig, stages: dict[str, PlannedStage]) -> None:
    """Refuse a ``layer`` beyond the previous iteration's model before anything runs (it used
    to fail at that iteration's features, after the previous one's training)."""
    for i, it in enumerate(cfg.iterations, start=1):
        if it.features != "model" or it.layer == "auto":
            continue
        depth = stages[f"it{i - 1}.train"].config.get("model", {}).get("encoder_layers")
        if depth is not None and not 1 <= int(it.layer) <= depth:
            raise PretrainError(f"iterations.{i - 1}.layer: {it.layer}, but iteration {i - 1}'s model has "
                                f"{depth} Transformer layers (1..{depth})")


def _has_phones50(cfg: IterateConfig, eval_shards: Path) -> bool:
    """Whether the evaluation shards have (or, synthesized, will have) 50 Hz phone labels."""
    if cfg.eval.shards is None:
        return True
    return (eval_shards / "labels" / "phones50" / "meta.json").is_file()


def _heldout_stages(cfg: IterateConfig, run: Path, i: int, it, eval_shards: Path, eval_up: list[str],
                    kmeans: PlannedStage, relocate: list[str]) -> list[PlannedStage]:
    """Held-out PNMI of iteration ``i``'s k-means (fitted on the training shards, scored on the
    evaluation shards), and for a model iteration whose k differs from iteration 1's, of an
    MFCC k-means at the same k: the iteration gain compared at equal k."""
    d = run / f"it{i}"

    def score(name: str, kmeans_dir: Path, out: Path, up: list[str], extra: list[str]) -> PlannedStage:
        return PlannedStage(name, ["kmeans", "quality", quote_override("kmeans", str(kmeans_dir)), *extra,
                                   "--shards", str(eval_shards), "--reference", "phones50", "--out", str(out)],
                            [out], out / "quality.json", [*up, *eval_up])

    stages = [score(f"it{i}.heldout", d / "kmeans", d / "heldout", [kmeans.name], relocate)]
    if i > 1 and it.k != cfg.iterations[0].k:
        mfcc = PlannedStage(f"it{i}.mfcc_kmeans", ["kmeans", "fit", "--features", str(run / "it1" / "features"),
                                                   "--out", str(d / "mfcc_kmeans"), "--k", str(it.k),
                                                   "--seed", str(it.kmeans_seed)],
                            [d / "mfcc_kmeans"], d / "mfcc_kmeans" / "kmeans.json", ["it1.features"],
                            done_check=_kmeans_done(d / "mfcc_kmeans"))
        stages += [mfcc, score(f"it{i}.mfcc_heldout", d / "mfcc_kmeans", d / "mfcc_heldout", [mfcc.name], [])]
    return stages


def _synth_options(cfg: IterateConfig, voices: list[str] | None) -> list[str]:
    """The corpus options both synthesized corpora share (sentence length, speaking rate)."""
    # overwrite: the stage runs only when not done, so what is in its folder is an interrupted
    # synthesis of this run's (synthesis restarts; it cannot resume).
    options = [f"max_clauses={cfg.corpus.synth_max_clauses}", "overwrite=true"]
    if cfg.corpus.synth_stretch != 1.0:
        options.append(f"stretch={cfg.corpus.synth_stretch}")
    if voices is not None:
        options.append(f"voices=[{','.join(voices)}]")
    return options


def _eval_stages(cfg: IterateConfig, run: Path, stages: list[PlannedStage], jobs: str) -> tuple[Path | None, list]:
    """The held-out evaluation corpus and shards the probes run on (``eval``)."""
    if cfg.eval.shards is not None:
        return Path(cfg.eval.shards).resolve(), []
    if cfg.eval.synth_hours is None:
        return None, []
    d = run / "eval"
    seed = cfg.corpus.synth_seed + cfg.eval.synth_seed_offset
    corpus = PlannedStage("eval.corpus", ["corpus", "synth", "--out", str(d / "corpus"), "--hours",
                                          str(cfg.eval.synth_hours), "--seed", str(seed),
                                          *_synth_options(cfg, cfg.eval.synth_voices), "--jobs", jobs],
                          [d / "corpus"], d / "corpus" / "corpus.json", [])
    shards = PlannedStage("eval.shards", ["shards", "build", "--input", str(d / "corpus"), "--out", str(d / "shards"),
                                          "--per-shard", str(cfg.corpus.per_shard), "--jobs", jobs],
                          [d / "shards"], d / "shards" / "manifest.json", [corpus.name])
    stages += [corpus, shards]
    return d / "shards", [shards.name]


def _fingerprint(stages: list[PlannedStage], run: Path) -> None:
    from pretrain.stages import resolve

    from pretrain.config import ConfigError

    prints: dict[str, str] = {}
    legacy: dict[str, str] = {}
    old_root = _legacy_root(run, stages)
    for stage in stages:
        try:
            _, cfg, _, _ = resolve(stage.argv)
        except ConfigError as e:
            raise PretrainError(f"stage {stage.name}: config error: {e}") from None
        stage.config = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
        # Settings that do not change results are left out: rerunning with more jobs or another
        # log cadence must not redo a finished stage.
        for key in HOW_NOT_WHAT:
            stage.config.pop(key, None)
        for key, default in ADDED_FIELDS.items():
            # A field added to a stage's config after runs were made must not invalidate (and
            # so delete) those runs while it keeps the value they were made with.
            command, _, key = key.rpartition(":")
            if command and " ".join(stage.argv[:2]) != command:
                continue
            *parents, leaf = key.split(".")
            section = stage.config
            for parent in parents:
                section = section.get(parent) if isinstance(section, dict) else None
            if isinstance(section, dict) and section.get(leaf, default) == default:
                section.pop(leaf, None)
        if stage.train:
            # Logging, the probes of saved checkpoints and the limits that stop a stuck job do
            # not change the trained model.
            for key in ("log", "probe", "stall_timeout", "startup_timeout", "collective_timeout"):
                stage.config.pop(key, None)
        if stage.argv[:2] in (["kmeans", "assign"], ["kmeans", "quality"]):
            # Where the features' model lives now: its sha256 is checked against the k-means'.
            stage.config.pop("checkpoint", None)
        stage.config = _relative(stage.config, str(run))
        old = hashlib.sha256(json.dumps(_relocated(stage.config, old_root), sort_keys=True).encode())
        h = hashlib.sha256(json.dumps(stage.config, sort_keys=True).encode())
        for up in stage.upstream:
            h.update(prints[up].encode())
            old.update(legacy[up].encode())
        stage.fingerprint = prints[stage.name] = h.hexdigest()
        stage.legacy_fingerprint = legacy[stage.name] = old.hexdigest()


def _relocated(value, root: str):
    """The inverse of ``_relative``: ``${run_dir}`` written as ``root``."""
    if isinstance(value, dict):
        return {k: _relocated(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocated(v, root) for v in value]
    if isinstance(value, str) and value.startswith(RUN_DIR):
        return root + value[len(RUN_DIR):]
    return value


def _legacy_root(run: Path, stages: list[PlannedStage]) -> str:
    """Where a run made before relative paths lived when its records were written (it may
    have moved since): read off a record's absolute output path. The run's own path if none."""
    for stage in stages:
        record = _read_record(run, stage.name)
        if not record or not record.get("outputs") or not stage.outputs:
            continue
        recorded, mine = record["outputs"][0], str(stage.outputs[0])
        if recorded.startswith(RUN_DIR):
            break
        tail = os.path.relpath(mine, str(run))
        if not tail.startswith("..") and recorded.endswith(os.sep + tail):
            return recorded[:-len(tail) - 1]
    return str(run)


def _record_path(run: Path, name: str) -> Path:
    return run / STAGES_DIR / f"{name}.json"


def _read_record(run: Path, name: str) -> dict | None:
    path = _record_path(run, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        # Records are written atomically; a damaged one was cut or edited by something else.
        raise PretrainError(f"stage record {path} is damaged ({e}); delete it to have stage {name} redone") from None
    if not isinstance(record, dict) or not isinstance(record.get("attempts"), list):
        raise PretrainError(f"stage record {path} is not a stage record (no list of attempts); delete it to "
                            f"have stage {name} redone")
    return record


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _carry_over(run: Path, stage: PlannedStage, record: dict | None, write: bool) -> dict | None:
    """A record written before fingerprints used relative paths, for the same config, is
    rewritten in today's form rather than invalidated (an upgrade must not delete a run)."""
    if record is None or record["fingerprint"] == stage.fingerprint \
            or record["fingerprint"] != stage.legacy_fingerprint:
        return record
    record = {**record, "fingerprint": stage.fingerprint, "config": redact(stage.config),
              "outputs": [_relative(str(p), str(run.resolve())) for p in stage.outputs]}
    if write:
        atomic_write_json(_record_path(run, stage.name), record)
    return record


def _owned(path: Path, run: Path, run_id: str) -> bool:
    """Whether invalidation may delete ``path``: inside the run directory, or a label set
    named with this run's id."""
    if _inside(path, run):
        return True
    return bool(run_id) and path.parent.name == "labels" and path.name.endswith(f"-{run_id}")


def invalidate_changed(cfg: IterateConfig, stages: list[PlannedStage], delete: bool = True) -> list[str]:
    """Delete the outputs and records of every stage whose fingerprint changed, and of
    everything downstream of it; returns their names (and logs why). ``delete=False`` only
    reports (a dry run). Nothing outside the run directory is deleted but a label set this
    run owns."""
    run = Path(cfg.run_dir)
    by_name = {s.name: s for s in stages}
    stale: list[str] = []
    run_id = run_identity(run, create=False) if (run / STAGES_DIR / IDENTITY).is_file() else ""
    for stage in stages:
        record = _carry_over(run, stage, _read_record(run, stage.name), write=delete)
        upstream_stale = [u for u in stage.upstream if u in stale]
        if upstream_stale:
            stale.append(stage.name)
        elif record is not None and record["fingerprint"] != stage.fingerprint:
            fields = _changed_fields(record["config"], stage.config) or ["an upstream stage's output"]
            downstream = _downstream(stages, stage.name)
            log.warning("stage %s: its config changed (%s); invalidating it and everything downstream: %s",
                        stage.name, "; ".join(fields[:8]), ", ".join(downstream) or "nothing")
            stale.append(stage.name)
    for name in stale if delete else ():
        stage = by_name[name]
        record = _read_record(run, name) or {}
        # The outputs the stage wrote under its old config too (a label set named by k, ...).
        for path in {*stage.outputs, *(_absolute(p, run.resolve()) for p in record.get("outputs", []))}:
            if not _owned(path, run, run_id):
                log.warning("stage %s: not deleting %s: it is outside the run directory %s and not a "
                            "label set of this run", name, path, run)
                continue
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        _record_path(run, name).unlink(missing_ok=True)
    return stale


def _downstream(stages: list[PlannedStage], name: str) -> list[str]:
    out: list[str] = []
    for stage in stages:
        if any(u == name or u in out for u in stage.upstream):
            out.append(stage.name)
    return out


def status(cfg: IterateConfig, stages: list[PlannedStage]) -> dict[str, str]:
    """done / pending for every stage (after invalidation)."""
    run = Path(cfg.run_dir)
    out = {}
    for stage in stages:
        record = _carry_over(run, stage, _read_record(run, stage.name), write=False)
        ok = record is not None and record["fingerprint"] == stage.fingerprint and stage.done()
        out[stage.name] = "done" if ok else "pending"
    return out


def _start_record(run: Path, stage: PlannedStage) -> None:
    record = _read_record(run, stage.name)
    if record is None or record["fingerprint"] != stage.fingerprint:
        record = {"name": stage.name, "fingerprint": stage.fingerprint, "config": redact(stage.config),
                  "argv": redact(["pretrain", *stage.argv]),
                  "outputs": [_relative(str(p), str(run.resolve())) for p in stage.outputs], "attempts": []}
    record["attempts"].append({"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    atomic_write_json(_record_path(run, stage.name), record)


def _finish_record(run: Path, stage: PlannedStage, seconds: float) -> None:
    record = _read_record(run, stage.name)
    record["attempts"][-1]["seconds"] = round(seconds, 1)
    record["seconds"] = round(sum(a.get("seconds", 0.0) for a in record["attempts"]), 1)
    atomic_write_json(_record_path(run, stage.name), record)


def _stage_env(stage: PlannedStage, child: bool = True) -> dict:
    from pretrain.lifecycle import LAUNCHER_ENV

    env = dict(os.environ)
    if child:
        env[LAUNCHER_ENV] = str(os.getpid())  # a stage dies with the iterate that started it
    else:
        env.pop(LAUNCHER_ENV, None)
    # Test-only fault injection reaches one chosen stage (see tests/test_iterate.py).
    only = env.pop("PRETRAIN_FAULT_STAGE", None)
    if only != stage.name:
        env.pop("PRETRAIN_FAULT", None)
    return env


def run_stage(cfg: IterateConfig, stage: PlannedStage, in_process: bool = False, progress: bool = True) -> None:
    """Run one stage: locally as a subprocess, or (``in_process``, a SLURM job or array task)
    in this process; ``progress=False`` (``iterate --no-progress``) reaches the stage too."""
    run = Path(cfg.run_dir)
    from pretrain.distributed import read_env

    main_rank = read_env().rank == 0
    if main_rank:
        _start_record(run, stage)
    started = time.monotonic()
    if in_process:
        from pretrain.stages import execute

        # Built from the environment before it is replaced: the job's rank, array task, PATH and
        # the profile's exports must all reach the stage (clearing first lost every one).
        env = _stage_env(stage, child=False)
        os.environ.clear()
        os.environ.update(env)
        code = execute([*stage.argv, "--no-progress"])  # training exits inside (engine.shutdown)
    else:
        quiet = [] if progress else ["--no-progress"]
        if stage.train:
            cmd = [str(Path(sys.executable).parent / "launch"), "local", "--nproc", str(cfg.nproc), "pretrain",
                   *stage.argv, *quiet]
        else:
            cmd = [sys.executable, "-m", "pretrain.cli", *stage.argv, *quiet]
        log.info("stage %s: %s", stage.name, " ".join(cmd))
        code = subprocess.run(cmd, env=_stage_env(stage)).returncode
    if code != 0:
        raise PretrainError(f"stage {stage.name} failed (exit status {code}); rerun the same command to "
                            "resume it")
    if stage.done():
        if main_rank:
            _finish_record(run, stage, time.monotonic() - started)
    elif not (in_process and stage.array):  # an array task may finish before its siblings
        raise PretrainError(f"stage {stage.name} ended without finishing ({stage.done_mark} missing or "
                            "incomplete); rerun the same command to resume it")


def command(cfg: IterateConfig, argv: list[str], progress: bool) -> int:
    """``pretrain iterate`` (registered in ``pretrain.stages``)."""
    return iterate(cfg, argv, progress)


def iterate(cfg: IterateConfig, argv: list[str] | None = None, progress: bool = True) -> int:
    from pretrain.config import write_run_record

    only = cfg.only
    run = Path(cfg.run_dir)
    refuse_foreign_record(run)
    run.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg)
    names = [s.name for s in stages]
    if only is not None:
        if only not in names:
            raise PretrainError(f"no stage '{only}' in this run; stages: {', '.join(names)}")
        stage = next(s for s in stages if s.name == only)
        if status(cfg, [stage])[only] == "done":
            log.info("stage %s: done already, nothing to do", only)
            return 0
        run_stage(cfg, stage, in_process=True)
        from pretrain.distributed import read_env

        # Under SLURM each stage is a job: the one that completes the chain writes the report
        # (training stages exit inside, so the chain never ends with one: probes follow it).
        if read_env().rank == 0 and all(state == "done" for state in status(cfg, stages).values()):
            from pretrain.report import write_report

            log.info("every stage is done; report: %s", write_report(cfg, stages))
        return 0
    from pretrain.lifecycle import RunLock

    lock = RunLock(run, "pretrain iterate").acquire()
    write_run_record(run, cfg, argv)
    invalidate_changed(cfg, stages)
    states = status(cfg, stages)
    started = time.monotonic()
    ran = []
    for stage in stages:
        if states[stage.name] == "done":
            log.info("stage %s: done, skipped", stage.name)
            continue
        log.info("stage %s: running", stage.name)
        run_stage(cfg, stage, progress=progress)
        ran.append(stage.name)
    from pretrain.report import write_report

    report = write_report(cfg, stages)
    print(f"{len(ran)} stages run ({', '.join(ran) or 'none: everything was done'}), "
          f"{len(stages) - len(ran)} skipped, in {time.monotonic() - started:.0f} s; report: {report}")
    lock.release()
    return 0
