"""``pretrain shards build`` and ``pretrain shards verify``."""

from __future__ import annotations

import sys

from pretrain.config.shards import ShardsBuildConfig, ShardsVerifyConfig
from pretrain.data.shards import build_shards, read_manifest, verify_shards


def build(cfg: ShardsBuildConfig, argv: list[str], progress: bool) -> int:
    manifest = build_shards(cfg, progress=progress, argv=argv)
    totals = manifest["totals"]
    print(f"wrote {totals['shards']} shards with {totals['utterances']} utterances "
          f"({totals['seconds'] / 3600:.3f} h, {totals['bytes'] / 1e6:.1f} MB) to {cfg.out}; "
          f"skipped {totals['skipped']} (see {cfg.out}/skipped.jsonl)")
    return 0


def verify(cfg: ShardsVerifyConfig, argv: list[str], progress: bool) -> int:
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
