"""``pretrain knnvc``."""

from __future__ import annotations

from pretrain.config.probe import KnnvcCommandConfig


def knnvc_command(cfg: KnnvcCommandConfig, argv: list[str], progress: bool) -> int:
    from pretrain.probe.knnvc import run_knnvc

    record = run_knnvc(cfg, progress=progress, argv=argv)
    m = record["mean"]
    print(f"kNN-VC {cfg.source} -> {cfg.target} in {record['what']} (k={record['k']}, reference "
          f"{record['reference_seconds']:.0f} s of {record['reference_utterances']} utterances):")
    for e in record["utterances"]:
        content = f", same phone {e['content']:.1f} %" if "content" in e else ""
        print(f"  {e['key']} ({e['seconds']:.1f} s) -> {e['wav']}: consecutive {e['smoothness']:.1f} %{content}, "
              f"re-encoded cosine {e['reencoded_cosine']:.3f}")
    print(f"mean: consecutive {m['smoothness']:.1f} %"
          + (f", same phone {m['content']:.1f} %" if "content" in m else "")
          + f"; cosine of the utterance mean to the target's {m['cosine_to_target_mean']:.3f} "
          f"(the source's own voice {m['source_cosine_to_target_mean']:.3f})")
    per = record["seconds_per_source_minute"]
    print(f"cost per minute of source audio: matching {per['match']:.3f} s, audio {per['audio']:.3f} s, "
          f"encoding {per['encode']:.2f} s")
    print(f"wrote {cfg.out}/knnvc.json, spectrograms.png and {len(record['utterances'])} converted WAVs")
    return 0
