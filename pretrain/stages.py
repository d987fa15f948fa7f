"""The stage registry: every ``pretrain`` subcommand, its config schema, its shorthand flags
and the adapter that runs it; the parser built from them; and ``resolve``, which turns a
command line into its stage and validated config without running anything.

Every stage command takes the same configuration arguments: ``--config FILE`` (repeatable;
later files win), a few shorthand flags for its most used fields, and ``key=value``
overrides, merged as dataclass defaults <- YAML files <- flags <- ``key=value``. The whole
configuration is validated before any work starts; ``--print-config`` shows the result and
exits. Stages register here as they land; there are no placeholder commands.

Users of the registry (``pretrain.cli``'s entry point, ``pretrain.iterate``, ``launch slurm``)
import this module; it imports the stage implementations only inside the adapters, and the
one stage that itself runs stages (``iterate``) by name (``_lazy``), so no import cycle runs
through it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pretrain import __version__
from pretrain.config import ConfigError, describe, load_config, quote_override, to_yaml
from pretrain.utils import PretrainError


@dataclass(frozen=True)
class Flag:
    """A shorthand option for one config field: ``--out DIR`` means ``out=DIR``."""

    option: str
    field: str
    type: Callable[[str], Any]
    help: str


@dataclass(frozen=True)
class Stage:
    group: str
    name: str | None
    """None for a stage that is a top-level command (``pretrain train``)."""
    help: str
    schema: Callable[[], type]
    """Returns the config dataclass (imported lazily so ``--help`` stays fast)."""
    run: Callable[[Any, list[str], bool], int]
    """``run(cfg, argv, progress) -> exit code``."""
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    positional: tuple[str, ...] = ()
    """Config fields that may also be given as the leading positional arguments, in order."""


# --------------------------------------------------------------------------- stages


def _corpus_schema() -> type:
    from pretrain.config.corpus import CorpusSynthConfig

    return CorpusSynthConfig


def _corpus_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.corpus.synth import synthesize_corpus

    summary = synthesize_corpus(cfg, progress=progress, argv=argv)
    print(f"wrote {summary['utterances']} utterances ({summary['seconds'] / 3600:.3f} h) from "
          f"{len(summary['voices'])} voices to {cfg.out}; {summary['failed']} failed")
    return 0 if summary["utterances"] > 0 else 1


def _noise_schema() -> type:
    from pretrain.config.corpus import NoiseSynthConfig

    return NoiseSynthConfig


def _noise_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.corpus.noise import synthesize_noise

    summary = synthesize_noise(cfg, progress=progress, argv=argv)
    kinds = ", ".join(f"{k} {n}" for k, n in summary["per_kind"].items())
    print(f"wrote {summary['clips']} noise clips ({summary['seconds'] / 60:.1f} min: {kinds}) to {cfg.out}")
    return 0


def _shards_build_schema() -> type:
    from pretrain.config.shards import ShardsBuildConfig

    return ShardsBuildConfig


def _shards_build_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.data.shards import build_shards

    manifest = build_shards(cfg, progress=progress, argv=argv)
    totals = manifest["totals"]
    print(f"wrote {totals['shards']} shards with {totals['utterances']} utterances "
          f"({totals['seconds'] / 3600:.3f} h, {totals['bytes'] / 1e6:.1f} MB) to {cfg.out}; "
          f"skipped {totals['skipped']} (see {cfg.out}/skipped.jsonl)")
    return 0


def _shards_verify_schema() -> type:
    from pretrain.config.shards import ShardsVerifyConfig

    return ShardsVerifyConfig


def _shards_verify_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.data.shards import read_manifest, verify_shards

    problems = verify_shards(cfg.dir, jobs=cfg.jobs, progress=progress)
    totals = read_manifest(cfg.dir)["totals"]
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problems in {cfg.dir}", file=sys.stderr)
        return 1
    print(f"ok: {totals['shards']} shards, {totals['utterances']} utterances, checksums match "
          "and every sample decodes")
    return 0


STAGES: tuple[Stage, ...] = (
    Stage(
        group="corpus",
        name="synth",
        help="synthesize a multi-voice English speech corpus with phone alignments (TTS)",
        schema=_corpus_schema,
        run=_corpus_run,
        flags=(
            Flag("--out", "out", str, "output directory"),
            Flag("--count", "count", int, "number of utterances"),
            Flag("--hours", "hours", float, "hours of audio (instead of --count)"),
            Flag("--seed", "seed", int, "corpus seed"),
            Flag("--jobs", "jobs", int, "worker processes (0: all cores)"),
        ),
    ),
    Stage(
        group="corpus",
        name="noise",
        help="synthesize varied non-speech noise clips (coloured, babble, hum, clicks, machine) "
             "for WavLM's noise mixing",
        schema=_noise_schema,
        run=_noise_run,
        flags=(
            Flag("--out", "out", str, "output directory"),
            Flag("--hours", "hours", float, "hours of noise"),
            Flag("--speech", "speech", str, "speech corpus to cut the babble from"),
            Flag("--seed", "seed", int, "noise seed"),
        ),
    ),
    Stage(
        group="shards",
        name="build",
        help="pack a corpus (folder, TSV or JSONL manifest) into WebDataset tar shards",
        schema=_shards_build_schema,
        run=_shards_build_run,
        flags=(
            Flag("--input", "input", str, "corpus folder or manifest"),
            Flag("--out", "out", str, "shard directory"),
            Flag("--per-shard", "per_shard", int, "utterances per shard"),
            Flag("--target-size", "target_size", str, "shard size bound such as 1GB"),
            Flag("--jobs", "jobs", int, "worker processes (0: all cores)"),
            Flag("--audio-format", "audio_format", str, "flac or wav"),
        ),
    ),
    Stage(
        group="shards",
        name="verify",
        help="check every shard's sha256 and decode every sample; non-zero exit on problems",
        schema=_shards_verify_schema,
        run=_shards_verify_run,
        flags=(Flag("--jobs", "jobs", int, "worker processes (0: all cores)"),),
        positional=("dir",),
    ),
)

def _train_schema() -> type:
    from pretrain.config.train import TrainConfig

    return TrainConfig


def _train_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.distributed import engine, read_env
    from pretrain.lifecycle import fail_fast
    from pretrain.train.loop import train

    try:
        # PRETRAIN_FAULT injects failures for the recovery tests (see train()); unset in real runs.
        result = train(cfg, argv, fault=json.loads(os.environ.get("PRETRAIN_FAULT", "{}")))
    except BaseException as e:  # noqa: BLE001 - any error on any rank ends the whole job, at once
        fail_fast("pretrain train", read_env().rank, e)
    # does not return: a clean exit for every rank (non-zero after a preemption that was not
    # requeued, see pretrain.train.loop.handle_preemption)
    engine.shutdown(result.get("exit_code", 0))
    return 0


def _export_hf_schema() -> type:
    from pretrain.config.export import ExportHfConfig

    return ExportHfConfig


def _export_hf_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.model.export import export_hf

    wrote = export_hf(cfg.checkpoint, cfg.out, cfg.overwrite)
    print(f"{'wrote' if wrote else 'already there, nothing written:'} a transformers model in {cfg.out}; load it "
          f"with transformers.AutoModel.from_pretrained('{cfg.out}')")
    return 0


STAGES += (
    Stage(
        group="train",
        name=None,
        help="train HuBERT with DeepSpeed (start it with `launch local --nproc N` or SLURM); "
             "relaunching in the same run_dir resumes",
        schema=_train_schema,
        run=_train_run,
        flags=(Flag("--run-dir", "run_dir", str, "run directory"),),
    ),
    Stage(
        group="export",
        name="hf",
        help="write a checkpoint's model as a Hugging Face transformers HubertModel directory",
        schema=_export_hf_schema,
        run=_export_hf_run,
        positional=("checkpoint", "out"),
    ),
)

def _cluster_schema(name: str) -> Callable[[], type]:
    """A lazy schema loader for the configs in ``pretrain/config/cluster.py``."""

    def load() -> type:
        from pretrain.config import cluster

        return getattr(cluster, name)

    return load


def _features_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.config import write_run_record
    from pretrain.features.extract import FeatureSpec
    from pretrain.features.sample import dump_features

    if hasattr(cfg, "checkpoint"):
        layer = cfg.layer
        if cfg.layer_from is not None:
            from pretrain.probe.run import chosen_layer

            layer = chosen_layer(cfg.layer_from, cfg.layer_metric)
            logging.getLogger("pretrain").info("layer %d: the best on %s in %s", layer, cfg.layer_metric,
                                               cfg.layer_from)
        spec = FeatureSpec.model(cfg.checkpoint, layer, cfg.chunk_seconds, cfg.chunk_context)
    else:
        spec = FeatureSpec.mfcc()
    write_run_record(cfg.out, cfg, argv)
    meta = dump_features(cfg, spec, progress=progress)
    if meta is None:
        print(f"this task's shards are done; {cfg.out}/meta.json is written when every task has finished")
    else:
        print(f"sampled {meta['total_frames']} frames of {meta['total_utterances']} utterances "
              f"({spec.describe()}) into {cfg.out}")
    return 0


def _kmeans_fit_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.cluster.kmeans import fit
    from pretrain.config import write_run_record

    write_run_record(cfg.out, cfg, argv)
    record = fit(cfg)
    print(f"k-means k={cfg.k} on {record['sample']['frames']} frames ({record['device']}, "
          f"{record['seconds']:.1f} s): inertia per point {record['inertia_per_point']:.4g}; wrote {cfg.out}")
    return 0


def _kmeans_assign_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.cluster.assign import assign_labels

    meta = assign_labels(cfg, progress=progress)
    if meta is None:
        print("this task's shards are labelled; meta.json is written when every task has finished")
    else:
        total = sum(e["utterances"] for e in meta["shards"].values())
        print(f"label set '{cfg.name}': {total} utterances in {len(meta['shards'])} shards, "
              f"k={meta['num_classes']}, {meta['label_rate']} Hz")
    return 0


def _kmeans_quality_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.cluster.quality import quality

    r = quality(cfg, progress)
    what = f"'{cfg.labels}'" if cfg.labels else f"k-means {cfg.kmeans}"
    print(f"{what} vs '{cfg.reference}' over {r['frames']} frames: PNMI {r['pnmi']:.4f}, phone purity "
          f"{r['phone_purity']:.4f}, cluster purity {r['cluster_purity']:.4f}, usage perplexity "
          f"{r['usage_perplexity']:.1f} of {r['clusters']} ({r['empty_clusters']} empty); report in {cfg.out}")
    return 0


_PARALLEL_FLAGS = (
    Flag("--jobs", "jobs", int, "worker processes (0: all cores)"),
    Flag("--device", "device", str, "auto, cpu or cuda (model features)"),
)

_SAMPLE_FLAGS = (
    Flag("--shards", "shards", str, "shard directory"), Flag("--out", "out", str, "output folder"),
    Flag("--fraction", "fraction", float, "fraction of utterances"),
    Flag("--max-frames", "max_frames", int, "bound on sampled frames"), *_PARALLEL_FLAGS,
)

STAGES += (
    Stage(
        group="features",
        name="mfcc",
        help="sample 39-dim MFCC frames (HuBERT iteration 1) from the shards for k-means",
        schema=_cluster_schema("FeaturesMfccConfig"),
        run=_features_run,
        flags=_SAMPLE_FLAGS,
    ),
    Stage(
        group="features",
        name="model",
        help="sample hidden states of one layer of a trained model from the shards for k-means",
        schema=_cluster_schema("FeaturesModelConfig"),
        run=_features_run,
        flags=(Flag("--checkpoint", "checkpoint", str, "model.pt or a checkpoint folder"),
               Flag("--layer", "layer", int, "Transformer layer (1-based)"), *_SAMPLE_FLAGS),
    ),
    Stage(
        group="kmeans",
        name="fit",
        help="fit FAISS k-means (GPU when present) on a feature sample",
        schema=_cluster_schema("KmeansFitConfig"),
        run=_kmeans_fit_run,
        flags=(Flag("--features", "features", str, "features folder"), Flag("--out", "out", str, "output folder"),
               Flag("--k", "k", int, "number of clusters"), Flag("--seed", "seed", int, "seed")),
    ),
    Stage(
        group="kmeans",
        name="assign",
        help="label every utterance of every shard with its nearest centroid (keyed label sidecars)",
        schema=_cluster_schema("KmeansAssignConfig"),
        run=_kmeans_assign_run,
        flags=(Flag("--kmeans", "kmeans", str, "folder from kmeans fit"), Flag("--shards", "shards", str, "shards"),
               Flag("--name", "name", str, "label set name"), *_PARALLEL_FLAGS),
    ),
    Stage(
        group="kmeans",
        name="quality",
        help="phone purity, cluster purity, PNMI and label usage against phone alignments (JSON + PNG)",
        schema=_cluster_schema("KmeansQualityConfig"),
        run=_kmeans_quality_run,
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--labels", "labels", str, "cluster label set"),
               Flag("--reference", "reference", str, "phone label set"), Flag("--out", "out", str, "report folder")),
    ),
)

def _probe_schema() -> type:
    from pretrain.config.probe import ProbeConfig

    return ProbeConfig


def _probe_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.probe.run import probe

    record = probe(cfg, progress=progress, argv=argv)
    print((Path(cfg.out) / "probe.md").read_text(), end="")
    print(f"wrote {cfg.out}/probe.json, probe.md, probe.png in {record['seconds']['total']:.1f} s")
    return 0


STAGES += (
    Stage(
        group="probe",
        name=None,
        help="frozen-feature probes (ABX, phone, speaker, PNMI) of every layer of a model on held-out "
             "shards, next to MFCC, log-mel and the untrained model",
        schema=_probe_schema,
        run=_probe_run,
        flags=(Flag("--checkpoint", "checkpoint", str, "model.pt, checkpoint folder or transformers folder"),
               Flag("--eval-shards", "eval_shards", str, "evaluation shards"),
               Flag("--out", "out", str, "output folder"),
               Flag("--layers", "layers", str, "all or 1,3,5"),
               Flag("--probes", "probes", str, "abx,phone,speaker,pnmi")),
    ),
)

def _iterate_schema() -> type:
    from pretrain.config.iterate import IterateConfig

    return IterateConfig


def _lazy(module: str, function: str) -> Callable:
    """An adapter imported by name when called: ``pretrain.iterate`` runs stages through this
    registry, so the registry must not import it, nor anything that imports it (``status``)."""
    import importlib

    return lambda *args: getattr(importlib.import_module(module), function)(*args)


_iterate_run = _lazy("pretrain.iterate", "command")


STAGES += (
    Stage(
        group="iterate",
        name=None,
        help="the whole iterative pipeline: corpus -> shards -> N x (features -> k-means -> labels -> "
             "train) -> export, with a report; rerunning skips finished stages",
        schema=_iterate_schema,
        run=_iterate_run,
        flags=(Flag("--run-dir", "run_dir", str, "run directory"),
               Flag("--only", "only", str, "run just this stage (SLURM jobs)")),
    ),
)

def _labels_schema(name: str) -> Callable[[], type]:
    def load() -> type:
        from pretrain.config import labels

        return getattr(labels, name)

    return load


def _labels_import_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.data.fairseq import import_fairseq

    meta, wrote = import_fairseq(cfg.shards, cfg.tsv, cfg.km, cfg.name, cfg.num_classes, cfg.rate, cfg.overwrite)
    total = sum(e["utterances"] for e in meta["shards"].values())
    print(f"label set '{cfg.name}'{'' if wrote else ' (already there with exactly these labels: nothing written)'}: "
          f"{total} utterances in {len(meta['shards'])} shards from {cfg.km}, "
          f"k={meta['num_classes']}, {meta['label_rate']} Hz")
    return 0


def _labels_export_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.data.fairseq import export_fairseq

    tsv, km, wrote = export_fairseq(cfg.shards, cfg.name, cfg.out, cfg.split or cfg.name, cfg.overwrite)
    print(f"wrote {tsv} and {km}" if wrote else f"{tsv} and {km} already hold exactly these labels: nothing written")
    return 0


def _labels_alignments_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.data.alignments import import_alignments

    names, wrote = import_alignments(cfg.shards, cfg.phone_map, cfg.textgrids, cfg.frames, cfg.frame_rate,
                                     cfg.tier, cfg.prefix, cfg.tolerance, cfg.overwrite)
    if not wrote:
        print(f"the label sets {', '.join(names)} of {cfg.shards} already hold exactly these labels: nothing written")
    else:
        print(f"wrote the label sets {', '.join(names)} into {cfg.shards} from {cfg.textgrids or cfg.frames}")
    return 0


STAGES += (
    Stage(
        group="labels",
        name="alignments",
        help="phone alignments (Praat TextGrids from MFA, or per-frame files) into reference label sets "
             "phones50/phones100",
        schema=_labels_schema("LabelsAlignmentsConfig"),
        run=_labels_alignments_run,
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--phone-map", "phone_map", str, "phone map"),
               Flag("--textgrids", "textgrids", str, "TextGrid folder"), Flag("--frames", "frames", str, "frame file")),
    ),
    Stage(
        group="labels",
        name="import",
        help="import a fairseq .tsv + .km pair as a keyed label set of the shards",
        schema=_labels_schema("LabelsImportConfig"),
        run=_labels_import_run,
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--tsv", "tsv", str, "fairseq .tsv"),
               Flag("--km", "km", str, "fairseq .km"), Flag("--name", "name", str, "label set name"),
               Flag("--rate", "rate", int, "label rate (50 or 100 Hz)")),
    ),
    Stage(
        group="labels",
        name="export",
        help="write a label set as a fairseq .tsv + .km pair",
        schema=_labels_schema("LabelsExportConfig"),
        run=_labels_export_run,
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--name", "name", str, "label set name"),
               Flag("--out", "out", str, "output folder")),
    ),
)


def _import_schema(name: str) -> Callable[[], type]:
    def load() -> type:
        from pretrain.config import imports

        return getattr(imports, name)

    return load


def _import_run(cfg: Any, argv: list[str], progress: bool) -> int:
    from pretrain.model.checkpoint import model_bytes
    from pretrain.model.imports import import_fairseq, import_hf
    from pretrain.utils import atomic_write_bytes, settle_existing

    kind = "fairseq" if type(cfg).__name__ == "ImportFairseqConfig" else "hf"
    out = Path(cfg.out)
    # Checked before the import: what no import may ever replace.
    if out.is_dir():
        raise PretrainError(f"{out} is a folder; name the model file to write (e.g. {out / 'model.pt'})")
    if (out.parent / "manifest.json").is_file():
        raise PretrainError(f"{out.parent} is a checkpoint folder (it has a manifest.json); writing {out.name} there "
                            "would replace its model and break the manifest: choose another out")
    model = (import_fairseq if kind == "fairseq" else import_hf)(cfg.source)
    data = model_bytes(model)
    c = model.cfg
    # After the import, not before: a rerun whose output is already there is no error.
    if settle_existing({out: data}, cfg.overwrite):
        print(f"{cfg.out} already holds this model ({c.arch}, {c.encoder_layers} layers): nothing written")
        return 0
    atomic_write_bytes(out, data)
    print(f"wrote {cfg.out}: a {c.arch} backbone, {c.encoder_layers} layers x {c.encoder_embed_dim} dims "
          f"(no label sets: use it for `features model`, `probe` or `train init_from=`)")
    return 0


STAGES += (
    Stage(group="import", name="hf", help="a transformers HubertModel / WavLMModel / Data2VecAudioModel folder into a pretrain model file",
          schema=_import_schema("ImportHfConfig"), run=_import_run, positional=("source", "out")),
    Stage(group="import", name="fairseq", help="a fairseq HuBERT checkpoint into a pretrain model file",
          schema=_import_schema("ImportFairseqConfig"), run=_import_run, positional=("source", "out")),
)


def _status_schema() -> type:
    from pretrain.config.status import StatusConfig

    return StatusConfig


_status_run = _lazy("pretrain.status", "command")  # status reads iterate's records


STAGES += (
    Stage(
        group="status",
        name=None,
        help="where a run is: each iterate stage's state, attempts, wall time and SLURM job, training "
             "step, loss, accuracy, speed and ETA, the newest checkpoint, label quality",
        schema=_status_schema,
        run=_status_run,
        flags=(Flag("--json", "json", bool, "print JSON"),),
        positional=("run_dir",),
    ),
)

GROUP_HELP = {
    "import": "models from transformers and fairseq into pretrain model files",
    "labels": "label sets: external phone alignments in, fairseq's .tsv + .km files in and out",
    "corpus": "speech corpora for tests and the demo",
    "shards": "WebDataset tar shards: build from a corpus, verify",
    "export": "export trained models to other frameworks",
    "features": "frame features for clustering: MFCC or a trained model's layer",
    "kmeans": "FAISS k-means: fit, assign labels to every shard, judge label quality",
}


# --------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Distributed self-supervised pretraining of HuBERT-style speech models.",
    )
    parser.add_argument("--version", action="version", version=f"pretrain {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    groups = parser.add_subparsers(dest="group", metavar="STAGE", required=True)
    group_parsers: dict[str, argparse._SubParsersAction] = {}
    for stage in STAGES:
        common = dict(help=stage.help, description=stage.help,
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(stage))
        if stage.name is None:  # a stage that is a command of its own: `pretrain train`
            sub = groups.add_parser(stage.group, **common)
        else:
            if stage.group not in group_parsers:
                group = groups.add_parser(stage.group, help=GROUP_HELP[stage.group],
                                          description=GROUP_HELP[stage.group])
                group_parsers[stage.group] = group.add_subparsers(dest="command", metavar="COMMAND",
                                                                  required=True)
            sub = group_parsers[stage.group].add_parser(stage.name, **common)
        sub.set_defaults(stage=stage)
        for name in stage.positional:
            sub.add_argument(f"flag_{name}", metavar=name.upper(), nargs="?", default=None,
                             help=f"same as {name}=...")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="config overrides, applied last (dotted keys for nested fields)")
        sub.add_argument("--config", action="append", default=[], metavar="FILE",
                         help="YAML config file; repeat to layer several (later files win)")
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved config and exit without running")
        sub.add_argument("--no-progress", action="store_true", help="hide progress bars")
        for flag in stage.flags:
            if flag.type is bool:  # a switch: --json means json=true
                sub.add_argument(flag.option, dest=f"flag_{flag.field}", action="store_const", const=True,
                                 default=None, help=f"{flag.help} (same as {flag.field}=true)")
                continue
            sub.add_argument(flag.option, dest=f"flag_{flag.field}", type=flag.type,
                             metavar=flag.field.upper(),
                             default=None, help=f"{flag.help} (same as {flag.field}=...)")
    return parser


def _epilog(stage: Stage) -> str:
    try:
        fields = describe(stage.schema())
    except Exception as e:  # --help must work even if a heavy import is broken
        fields = f"  (config fields unavailable: {e})"
    return ("configuration fields (set in a YAML file given with --config, or as key=value):\n"
            + fields)


def resolve(argv: Sequence[str]) -> tuple[Stage, Any, argparse.Namespace, str]:
    """Parse a ``pretrain`` command line into its stage, resolved config, parsed arguments and
    program name, without running anything (``launch slurm`` renders jobs from it). Raises
    ``ConfigError`` for a bad config; argparse exits on bad arguments."""
    args = build_parser().parse_args(list(argv))
    stage: Stage = args.stage
    prog = " ".join(["pretrain", stage.group] + ([stage.name] if stage.name else []))
    overrides, leading = list(args.overrides), []
    for name in stage.positional:
        value = getattr(args, "flag_" + name)
        if value is not None and "=" in value:  # argparse took an override for the positional
            overrides.insert(len(leading), value)
        elif value is not None:
            leading.append(quote_override(name, value))
    overrides = leading + overrides
    flag_overrides = [quote_override(flag.field, getattr(args, "flag_" + flag.field))
                      for flag in stage.flags if getattr(args, "flag_" + flag.field) is not None]
    try:
        cfg = load_config(stage.schema(), args.config, flag_overrides + overrides)
    except ConfigError as e:
        e.prog = prog
        raise
    return stage, cfg, args, prog


def execute(argv: Sequence[str]) -> int:
    """Run the ``pretrain`` command line ``argv``; returns its exit status (errors the user
    can fix are printed without a traceback)."""
    argv = list(argv)
    try:
        stage, cfg, args, prog = resolve(argv)
    except ConfigError as e:
        print(f"{e.prog}: config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # FAISS's loader logs each build it tries at INFO ("ModuleNotFoundError ... swigfaiss_avx512"
    # on a machine without that build): noise that reads like a failure.
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if args.log_level == "DEBUG" else logging.WARNING)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        return stage.run(cfg, ["pretrain", *argv], not args.no_progress)
    except (PretrainError, ConfigError, FileExistsError, FileNotFoundError) as e:
        # ConfigError too: a stage may read a saved config (status, iterate's records).
        logging.getLogger("pretrain").debug("stage failed", exc_info=True)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - anything else is ours to fix: said so, with the traceback
        import traceback

        traceback.print_exc()
        print(f"{prog}: internal error (a bug in pretrain {__version__}; please report it with the traceback "
              f"above): {type(e).__name__}: {e}", file=sys.stderr)
        return 1

