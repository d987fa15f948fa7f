"""``pretrain features mfcc|model`` and ``pretrain kmeans fit|assign|quality``."""

from __future__ import annotations

import logging

from pretrain.cluster.assign import assign_labels
from pretrain.cluster.kmeans import fit
from pretrain.cluster.quality import quality
from pretrain.config import write_run_record
from pretrain.config.core import refuse_foreign_record
from pretrain.config.cluster import (FeaturesMfccConfig, FeaturesModelConfig, KmeansAssignConfig, KmeansFitConfig,
                                     KmeansQualityConfig)
from pretrain.features.extract import FeatureSpec
from pretrain.features.sample import dump_features
from pretrain.probe.results import chosen_layer

log = logging.getLogger("pretrain")


def features(cfg: FeaturesMfccConfig | FeaturesModelConfig, argv: list[str], progress: bool) -> int:
    if isinstance(cfg, FeaturesModelConfig):
        layer = cfg.layer
        if cfg.layer_from is not None:  # `layer: auto` in iterate: the previous probes' best
            layer = chosen_layer(cfg.layer_from, cfg.layer_metric)
            log.info("layer %d: the best on %s in %s", layer, cfg.layer_metric, cfg.layer_from)
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


def kmeans_fit(cfg: KmeansFitConfig, argv: list[str], progress: bool) -> int:
    write_run_record(cfg.out, cfg, argv)
    record = fit(cfg)
    print(f"k-means k={cfg.k} on {record['sample']['frames']} frames ({record['device']}, "
          f"{record['seconds']:.1f} s): inertia per point {record['inertia_per_point']:.4g}; wrote {cfg.out}")
    return 0


def kmeans_assign(cfg: KmeansAssignConfig, argv: list[str], progress: bool) -> int:
    meta = assign_labels(cfg, progress=progress)
    if meta is None:
        print("this task's shards are labelled; meta.json is written when every task has finished")
    else:
        total = sum(e["utterances"] for e in meta["shards"].values())
        print(f"label set '{cfg.name}': {total} utterances in {len(meta['shards'])} shards, "
              f"k={meta['num_classes']}, {meta['label_rate']} Hz")
    return 0


def kmeans_quality(cfg: KmeansQualityConfig, argv: list[str], progress: bool) -> int:
    refuse_foreign_record(cfg.out)
    r = quality(cfg, progress)
    # After the report: inputs that turn out wrong (a label set at another rate) leave no trace.
    write_run_record(cfg.out, cfg, argv)
    what = f"'{cfg.labels}'" if cfg.labels else f"k-means {cfg.kmeans}"
    print(f"{what} vs '{cfg.reference}' over {r['frames']} frames: PNMI {r['pnmi']:.4f}, phone purity "
          f"{r['phone_purity']:.4f}, cluster purity {r['cluster_purity']:.4f}, usage perplexity "
          f"{r['usage_perplexity']:.1f} of {r['clusters']} ({r['empty_clusters']} empty); report in {cfg.out}")
    return 0
