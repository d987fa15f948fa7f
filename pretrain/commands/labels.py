"""``pretrain labels alignments|import|export``."""

from __future__ import annotations

from pretrain.config.labels import LabelsAlignmentsConfig, LabelsExportConfig, LabelsImportConfig
from pretrain.data.alignments import import_alignments
from pretrain.data.fairseq import export_fairseq, import_fairseq


def import_labels(cfg: LabelsImportConfig, argv: list[str], progress: bool) -> int:
    meta, wrote = import_fairseq(cfg.shards, cfg.tsv, cfg.km, cfg.name, cfg.num_classes, cfg.rate, cfg.overwrite)
    total = sum(e["utterances"] for e in meta["shards"].values())
    print(f"label set '{cfg.name}'{'' if wrote else ' (already there with exactly these labels: nothing written)'}: "
          f"{total} utterances in {len(meta['shards'])} shards from {cfg.km}, "
          f"k={meta['num_classes']}, {meta['label_rate']} Hz")
    return 0


def export_labels(cfg: LabelsExportConfig, argv: list[str], progress: bool) -> int:
    tsv, km, wrote = export_fairseq(cfg.shards, cfg.name, cfg.out, cfg.split or cfg.name, cfg.overwrite)
    print(f"wrote {tsv}, {km} and {tsv.parent / 'dict.km.txt'}" if wrote
          else f"{tsv}, {km} and dict.km.txt already hold exactly these labels: nothing written")
    return 0


def alignments(cfg: LabelsAlignmentsConfig, argv: list[str], progress: bool) -> int:
    names, wrote = import_alignments(cfg.shards, cfg.phone_map, cfg.textgrids, cfg.frames, cfg.frame_rate,
                                     cfg.tier, cfg.prefix, cfg.tolerance, cfg.overwrite)
    if not wrote:
        print(f"the label sets {', '.join(names)} of {cfg.shards} already hold exactly these labels: nothing written")
    else:
        print(f"wrote the label sets {', '.join(names)} into {cfg.shards} from {cfg.textgrids or cfg.frames}")
    return 0
