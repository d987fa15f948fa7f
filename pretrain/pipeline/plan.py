"""The stage graph of an ``iterate`` run: ``plan`` turns an ``IterateConfig`` into the fixed
list of stages, each a ``pretrain`` command line with its outputs, its completion mark and the
stages it reads from::

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

With ``eval``, ``eval.corpus`` and ``eval.shards`` make the held-out evaluation shards
(``eval.shards`` alone shards ``eval.input``, a corpus of the user's; or ``eval.shards`` names
existing ones), and ``layer: auto`` makes ``it<i>.features`` read the layer from
``it<i-1>.probe``'s ``probe.json`` when it runs.

Each stage's config is resolved through the registry (``pretrain.stages.resolve``), without
the fields that do not change what it makes (``jobs``, logging, ...), with paths inside the run
written as ``${run_dir}/...``: what ``pretrain.pipeline.ledger`` fingerprints. A stage is done
when its completion mark, always the last file it writes, is there and whole: ``corpus.json``,
``manifest.json``, ``meta.json`` whose provenance names this iteration's centroids,
``kmeans.json`` whose centroid sha256 matches ``centroids.npy``, ``quality.json``, the last
checkpoint, ``config.json``. Unfinished stages resume by themselves when run again (shards,
features and labels are idempotent per shard, training resumes from its newest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from pretrain.config import ConfigError, quote_override
from pretrain.config.core import HOW_NOT_WHAT
from pretrain.config.iterate import IterateConfig
from pretrain.pipeline.ledger import fingerprint, inside, relative, run_identity
from pretrain.resources import config_path
from pretrain.stages import resolve
from pretrain.utils import PretrainError, sha256_file

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
    config: dict = field(default_factory=dict)
    """The resolved config as fingerprints see it (``pretrain.pipeline.ledger``)."""
    defaults: dict = field(default_factory=dict)
    """The same of the schema's defaults."""

    def done(self) -> bool:
        if not self.done_mark.exists():
            return False
        if callable(self.done_check):
            return self.done_check()
        return self.done_check is None or self.done_mark.read_text().strip() == self.done_check


def shards_dir(cfg: IterateConfig) -> Path:
    return Path(cfg.corpus.shards) if cfg.corpus.shards else Path(cfg.run_dir) / "shards"


def wandb_group(run: Path) -> str:
    """The wandb group of a run's trainings: its folder's name and a hash of its path (two runs
    called ``base`` in different places are different groups; a resume is the same)."""
    return f"{run.name}-{hashlib.sha256(str(run.resolve()).encode()).hexdigest()[:6]}"


def label_name(i: int, k: int, run_id: str = "") -> str:
    """Iteration ``i``'s label set; ``run_id`` (for shards outside the run) makes it this run's."""
    return f"it{i}_km{k}" + (f"-{run_id}" if run_id else "")


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


def _refuse_label_free(cfg: IterateConfig) -> None:
    """Every iteration here clusters and trains on the labels; data2vec (an EMA teacher) and
    wav2vec 2.0 (its own quantized targets) use none, so such a run is refused before anything
    is planned (its own validation would otherwise stop it at the training stage, naming
    data.labels)."""
    learns = {"data2vec": "from an EMA teacher", "wav2vec2": "its own quantized targets"}
    files = [OmegaConf.load(config_path(path)) for path in cfg.train_configs]
    for i, it in enumerate(cfg.iterations):
        merged = OmegaConf.merge(*files, OmegaConf.from_dotlist([*cfg.train_overrides, *it.train_overrides]))
        objective = OmegaConf.select(merged, "model.objective", default="hubert")
        if objective in learns:
            raise PretrainError(
                f"iterations.{i}: its training has model.objective={objective} (from train_configs/train_overrides), "
                f"which learns {learns[objective]} without cluster labels, but each iteration of pretrain iterate "
                f"clusters (iterations.{i}.k={it.k}) and trains on the labels; train {objective} with `pretrain "
                "train` (or `launch slurm train`) and data.labels=[]")


def plan(cfg: IterateConfig, create_identity: bool = True) -> list[PlannedStage]:
    """The stages of ``cfg``; ``create_identity=False`` (a dry run) writes nothing."""
    _refuse_label_free(cfg)
    run = Path(cfg.run_dir).resolve()
    shards = shards_dir(cfg).resolve()
    run_id = "" if inside(shards, run) else run_identity(run, create_identity)
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
                                              "--per-shard", str(cfg.corpus.per_shard), "--jobs", jobs,
                                              *cfg.corpus.shards_overrides],
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
        # overwrite: the stage runs only when not done, so a set of this run's name made from other
        # centroids is this run's own stale output (a refitted k-means) - unless the shards are
        # shared and the run has no id (made before ids), when the name may be another run's.
        own = ["overwrite=true"] if inside(shards, run) or run_id else []
        labels = PlannedStage(f"it{i}.labels", ["kmeans", "assign", *relocate, *own, "--kmeans", str(d / "kmeans"),
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
        # One wandb group per run, a named run per training (log.* never changes a fingerprint).
        features = "mfcc" if it.features == "mfcc" else f"layer-{it.layer}"
        train_argv += [quote_override("log.wandb_group", wandb_group(run)), f"log.wandb_name=it{i}.train",
                       f"log.wandb_tags=[hubert,it{i},k{it.k},{features}]"]
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
        # overwrite: run/hf is this run's (an export not finished, or of a checkpoint since redone).
        stages.append(PlannedStage("export", ["export", "hf", str(last), str(run / "hf"), "overwrite=true"], [run / "hf"],
                                   run / "hf" / "config.json", [previous_train.name]))
    _configure(stages, run)
    fingerprint(stages)
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
    """Whether the evaluation shards have (or will have) 50 Hz phone labels: synthesized ones
    and shards of a synthetic corpus do; others when they are there already."""
    if cfg.eval.shards is None and cfg.eval.input is None:
        return True
    if cfg.eval.input is not None and (Path(cfg.eval.input) / "corpus.json").is_file():
        return True  # our synthetic corpora carry phone alignments into their shards
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
    d = run / "eval"
    if cfg.eval.input is not None:
        shards = PlannedStage("eval.shards", ["shards", "build", "--input", cfg.eval.input, "--out", str(d / "shards"),
                                              "--per-shard", str(cfg.corpus.per_shard), "--jobs", jobs,
                                              *cfg.eval.shards_overrides],
                              [d / "shards"], d / "shards" / "manifest.json", [])
        stages.append(shards)
        return d / "shards", [shards.name]
    if cfg.eval.synth_hours is None:
        return None, []
    seed = cfg.corpus.synth_seed + cfg.eval.synth_seed_offset
    corpus = PlannedStage("eval.corpus", ["corpus", "synth", "--out", str(d / "corpus"), "--hours",
                                          str(cfg.eval.synth_hours), "--seed", str(seed),
                                          *_synth_options(cfg, cfg.eval.synth_voices), "--jobs", jobs],
                          [d / "corpus"], d / "corpus" / "corpus.json", [])
    shards = PlannedStage("eval.shards", ["shards", "build", "--input", str(d / "corpus"), "--out", str(d / "shards"),
                                          "--per-shard", str(cfg.corpus.per_shard), "--jobs", jobs,
                                          *cfg.eval.shards_overrides],
                          [d / "shards"], d / "shards" / "manifest.json", [corpus.name])
    stages += [corpus, shards]
    return d / "shards", [shards.name]


# Fields of a training stage that do not change the trained model: logging, the probes of
# saved checkpoints, the limits that stop a stuck job.
_TRAIN_HOW = ("log", "probe", "stall_timeout", "startup_timeout", "collective_timeout")


def _configure(stages: list[PlannedStage], run: Path) -> None:
    """Each stage's resolved config and its schema's defaults, as fingerprints see them."""
    for stage in stages:
        try:
            _, cfg, _, _ = resolve(stage.argv)
        except ConfigError as e:
            raise PretrainError(f"stage {stage.name}: config error: {e}") from None
        views = []
        for value in (cfg, type(cfg)):
            view = OmegaConf.to_container(OmegaConf.structured(value), enum_to_str=True)
            # Rerunning with more jobs or another log cadence must not redo a finished stage.
            for key in (*HOW_NOT_WHAT, *(_TRAIN_HOW if stage.train else ())):
                view.pop(key, None)
            if stage.argv[:2] in (["kmeans", "assign"], ["kmeans", "quality"]):
                # Where the features' model lives now: its sha256 is checked against the k-means'.
                view.pop("checkpoint", None)
            views.append(relative(view, str(run)))
        stage.config, stage.defaults = views
