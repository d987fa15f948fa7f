"""The stage registry: every ``pretrain`` subcommand as a table of names (its config schema
and its runner, each a ``module:name`` string resolved by ``by_name`` when used), its shorthand
flags; the parser built from them; and ``resolve``, which turns a command line into its stage
and validated config without running anything.

Every stage command takes the same configuration arguments: ``--config FILE`` (repeatable;
later files win), a few shorthand flags for its most used fields, and ``key=value``
overrides, merged as dataclass defaults <- YAML files <- flags <- ``key=value``. The whole
configuration is validated before any work starts; ``--print-config`` shows the result and
exits. Stages register here as they land; there are no placeholder commands.

Users of the registry (``pretrain.cli``'s entry point, ``pretrain.pipeline``, ``launch slurm``)
import this module; it imports no stage module (the runners are in ``pretrain.commands``, the
pipeline's in ``pretrain.pipeline.run`` and ``.status``), so no import cycle runs through
it (``tests/test_layers.py``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence
import traceback

from pretrain import __version__
from pretrain.config import ConfigError, describe, load_config, quote_override, template_yaml, to_yaml
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
    schema: str
    """The config dataclass, as ``module:name``."""
    run: str
    """The runner, ``run(cfg, argv, progress) -> exit code``, as ``module:function``
    (``pretrain.commands``, or the pipeline's own)."""
    flags: tuple[Flag, ...] = field(default_factory=tuple)
    positional: tuple[str, ...] = ()
    """Config fields that may also be given as the leading positional arguments, in order."""

    def config_class(self) -> type:
        return by_name(self.schema)

    def runner(self) -> Callable[[Any, list[str], bool], int]:
        return by_name(self.run)


def by_name(ref: str) -> Any:
    """The object ``module:name`` names, imported now: the registry imports no stage module, so
    ``pretrain --help`` loads only the config schemas, and the pipeline, which runs stages
    through this registry, can be one of them without a circle."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------- stages

_PARALLEL_FLAGS = (
    Flag("--jobs", "jobs", int, "worker processes (0: all cores)"),
    Flag("--device", "device", str, "auto, cpu or cuda (model features)"),
)

_SAMPLE_FLAGS = (
    Flag("--shards", "shards", str, "shard directory"), Flag("--out", "out", str, "output folder"),
    Flag("--fraction", "fraction", float, "fraction of utterances"),
    Flag("--max-frames", "max_frames", int, "bound on sampled frames"), *_PARALLEL_FLAGS,
)

STAGES: tuple[Stage, ...] = (
    Stage(
        group="corpus",
        name="synth",
        help="synthesize a multi-voice English speech corpus with phone alignments (TTS)",
        schema="pretrain.config.corpus:CorpusSynthConfig",
        run="pretrain.commands.corpus:synth",
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
        schema="pretrain.config.corpus:NoiseSynthConfig",
        run="pretrain.commands.corpus:noise",
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
        schema="pretrain.config.shards:ShardsBuildConfig",
        run="pretrain.commands.shards:build",
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
        schema="pretrain.config.shards:ShardsVerifyConfig",
        run="pretrain.commands.shards:verify",
        flags=(Flag("--jobs", "jobs", int, "worker processes (0: all cores)"),),
        positional=("dir",),
    ),
    Stage(
        group="train",
        name=None,
        help="train HuBERT with DeepSpeed (start it with `launch local --nproc N` or SLURM); "
             "relaunching in the same run_dir resumes",
        schema="pretrain.config.train:TrainConfig",
        run="pretrain.commands.train:train_command",
        flags=(Flag("--run-dir", "run_dir", str, "run directory"),),
    ),
    Stage(
        group="export",
        name="hf",
        help="write a checkpoint's model as a Hugging Face transformers HubertModel directory",
        schema="pretrain.config.export:ExportHfConfig",
        run="pretrain.commands.models:export",
        positional=("checkpoint", "out"),
    ),
    Stage(
        group="features",
        name="mfcc",
        help="sample 39-dim MFCC frames (HuBERT iteration 1) from the shards for k-means",
        schema="pretrain.config.cluster:FeaturesMfccConfig",
        run="pretrain.commands.clustering:features",
        flags=_SAMPLE_FLAGS,
    ),
    Stage(
        group="features",
        name="model",
        help="sample hidden states of one layer of a trained model from the shards for k-means",
        schema="pretrain.config.cluster:FeaturesModelConfig",
        run="pretrain.commands.clustering:features",
        flags=(Flag("--checkpoint", "checkpoint", str, "model.pt or a checkpoint folder"),
               Flag("--layer", "layer", int, "Transformer layer (1-based)"), *_SAMPLE_FLAGS),
    ),
    Stage(
        group="kmeans",
        name="fit",
        help="fit FAISS k-means (GPU when present) on a feature sample",
        schema="pretrain.config.cluster:KmeansFitConfig",
        run="pretrain.commands.clustering:kmeans_fit",
        flags=(Flag("--features", "features", str, "features folder"), Flag("--out", "out", str, "output folder"),
               Flag("--k", "k", int, "number of clusters"), Flag("--seed", "seed", int, "seed")),
    ),
    Stage(
        group="kmeans",
        name="assign",
        help="label every utterance of every shard with its nearest centroid (keyed label sidecars)",
        schema="pretrain.config.cluster:KmeansAssignConfig",
        run="pretrain.commands.clustering:kmeans_assign",
        flags=(Flag("--kmeans", "kmeans", str, "folder from kmeans fit"), Flag("--shards", "shards", str, "shards"),
               Flag("--name", "name", str, "label set name"), *_PARALLEL_FLAGS),
    ),
    Stage(
        group="kmeans",
        name="quality",
        help="phone purity, cluster purity, PNMI and label usage against phone alignments (JSON + PNG)",
        schema="pretrain.config.cluster:KmeansQualityConfig",
        run="pretrain.commands.clustering:kmeans_quality",
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--labels", "labels", str, "cluster label set"),
               Flag("--reference", "reference", str, "phone label set"), Flag("--out", "out", str, "report folder")),
    ),
    Stage(
        group="probe",
        name=None,
        help="frozen-feature probes (ABX, phone, speaker, PNMI, kNN-VC) of every layer of a model on held-out "
             "shards, next to MFCC, log-mel and the untrained model",
        schema="pretrain.config.probe:ProbeConfig",
        run="pretrain.commands.probe:probe_command",
        flags=(Flag("--checkpoint", "checkpoint", str, "model.pt, checkpoint folder or transformers folder"),
               Flag("--eval-shards", "eval_shards", str, "evaluation shards"),
               Flag("--out", "out", str, "output folder"),
               Flag("--layers", "layers", str, "all or 1,3,5"),
               Flag("--probes", "probes", str, "abx,phone,speaker,pnmi[,knnvc]")),
    ),
    Stage(
        group="knnvc",
        name=None,
        help="kNN voice conversion of a speaker's utterances to another's voice in one layer of a model "
             "(or MFCC / log-mel), vocoder-free: WAVs, spectrograms and metrics",
        schema="pretrain.config.probe:KnnvcCommandConfig",
        run="pretrain.commands.knnvc:knnvc_command",
        flags=(Flag("--checkpoint", "checkpoint", str, "model.pt, checkpoint folder or transformers folder"),
               Flag("--shards", "shards", str, "shards with both speakers"),
               Flag("--source", "source", str, "source speaker"),
               Flag("--target", "target", str, "target speaker"),
               Flag("--out", "out", str, "output folder"),
               Flag("--layer", "layer", str, "layer number or auto")),
    ),
    Stage(
        group="iterate",
        name=None,
        help="the whole iterative pipeline: corpus -> shards -> N x (features -> k-means -> labels -> "
             "train) -> export, with a report; rerunning skips finished stages",
        schema="pretrain.config.iterate:IterateConfig",
        run="pretrain.pipeline.run:command",
        flags=(Flag("--run-dir", "run_dir", str, "run directory"),
               Flag("--only", "only", str, "run just this stage (SLURM jobs)"),
               Flag("--dry-run", "dry_run", bool, "print the plan (done, to run, to rerun and why); run nothing")),
    ),
    Stage(
        group="labels",
        name="alignments",
        help="phone alignments (Praat TextGrids from MFA, or per-frame files) into reference label sets "
             "phones50/phones100",
        schema="pretrain.config.labels:LabelsAlignmentsConfig",
        run="pretrain.commands.labels:alignments",
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--phone-map", "phone_map", str, "phone map"),
               Flag("--textgrids", "textgrids", str, "TextGrid folder"), Flag("--frames", "frames", str, "frame file")),
    ),
    Stage(
        group="labels",
        name="import",
        help="import a fairseq .tsv + .km pair as a keyed label set of the shards",
        schema="pretrain.config.labels:LabelsImportConfig",
        run="pretrain.commands.labels:import_labels",
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--tsv", "tsv", str, "fairseq .tsv"),
               Flag("--km", "km", str, "fairseq .km"), Flag("--name", "name", str, "label set name"),
               Flag("--rate", "rate", int, "label rate (50 or 100 Hz)")),
    ),
    Stage(
        group="labels",
        name="export",
        help="write a label set as a fairseq .tsv + .km pair",
        schema="pretrain.config.labels:LabelsExportConfig",
        run="pretrain.commands.labels:export_labels",
        flags=(Flag("--shards", "shards", str, "shard directory"), Flag("--name", "name", str, "label set name"),
               Flag("--out", "out", str, "output folder")),
    ),
    Stage(group="import", name="hf",
          help="a transformers HubertModel / WavLMModel / Data2VecAudioModel folder into a pretrain model file",
          schema="pretrain.config.imports:ImportHfConfig", run="pretrain.commands.models:import_model",
          positional=("source", "out")),
    Stage(group="import", name="fairseq", help="a fairseq HuBERT checkpoint into a pretrain model file",
          schema="pretrain.config.imports:ImportFairseqConfig", run="pretrain.commands.models:import_model",
          positional=("source", "out")),
    Stage(
        group="status",
        name=None,
        help="where a run is: each iterate stage's state, attempts, wall time and SLURM job, training "
             "step, loss, accuracy, speed and ETA, the newest checkpoint, label quality",
        schema="pretrain.config.status:StatusConfig",
        run="pretrain.pipeline.status:command",
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


@functools.lru_cache(maxsize=1)
def build_parser() -> argparse.ArgumentParser:
    """The whole ``pretrain`` parser, built once per process: its help texts describe every
    stage's config fields, which costs most of a second, and iterate resolves a command line
    per stage (18 for the demo)."""
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
        sub.add_argument("--print-template", action="store_true",
                         help="print every config field at its default, the required ones marked, and exit")
        # Also after the stage: `pretrain train --log-level DEBUG ...` as well as before it.
        sub.add_argument("--log-level", dest="stage_log_level", default=None,
                         choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
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
        fields = describe(stage.config_class())
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
        cfg = load_config(stage.config_class(), args.config, flag_overrides + overrides)
    except ConfigError as e:
        e.prog = prog
        raise
    return stage, cfg, args, prog


def execute(argv: Sequence[str]) -> int:
    """Run the ``pretrain`` command line ``argv``; returns its exit status (errors the user
    can fix are printed without a traceback)."""
    argv = list(argv)
    parsed = build_parser().parse_args(argv)
    if parsed.print_template:  # before resolving: the required fields are what it shows unset
        print(template_yaml(parsed.stage.config_class()), end="")
        return 0
    try:
        stage, cfg, args, prog = resolve(argv)
    except ConfigError as e:
        print(f"{e.prog}: config error: {e}", file=sys.stderr)
        return 2
    level = args.stage_log_level or args.log_level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # FAISS's loader logs each build it tries at INFO ("ModuleNotFoundError ... swigfaiss_avx512"
    # on a machine without that build): noise that reads like a failure.
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        return stage.runner()(cfg, ["pretrain", *argv], not args.no_progress)
    except (PretrainError, ConfigError, FileExistsError, FileNotFoundError) as e:
        # ConfigError too: a stage may read a saved config (status, iterate's records).
        logging.getLogger("pretrain").debug("stage failed", exc_info=True)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - anything else is ours to fix: said so, with the traceback
        traceback.print_exc()
        print(f"{prog}: internal error (a bug in pretrain {__version__}; please report it with the traceback "
              f"above): {type(e).__name__}: {e}", file=sys.stderr)
        return 1

