"""kNN-VC: which overlap-add window (and how many matches in the audio) carries the matched
features best, and what a minute of source audio costs, side by side in one run.

For ordered speaker pairs of an evaluation set (sources: the source speaker's probe-test
utterances; reference: the target's other ones, as the probe does), every source frame is
matched in one layer of the model and the audio is overlap-added with each window and k. The
converted audio is then encoded again by the same layer; the figure of merit is the mean
frame cosine between those features and the converted features the audio was made from
(``reencoded_cosine``: 1 = the audio says exactly what the matching chose), next to the
utterance-mean cosine to the target's reference (``to_target``) and to the source's own
(``to_source``). Costs are seconds per minute of source audio: FAISS matching, overlap-add,
and the model's forward (the reference and the sources).

    python benchmarks/knnvc.py --checkpoint RUN/it2/train/checkpoints/step_800 --shards RUN/eval/shards
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pretrain.model.states import LayerStates
from pretrain.probe.data import load_eval_set
from pretrain.probe.knnvc import KnnvcProbe, Reference, convert, overlap_add, unit
from pretrain.probe.features import offsets_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--windows", default="640,960,1280")
    ap.add_argument("--ks", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    states = LayerStates(args.checkpoint, "cpu")
    layer = min(args.layer, states.num_layers)
    es = load_eval_set(args.shards)
    waves = [u.audio for u in es.utterances]
    t = time.perf_counter()
    feats = states(waves, [layer])[layer]
    encode_s = time.perf_counter() - t
    probe = KnnvcProbe(es, offsets_of(waves), 4, 640, args.pairs, 0, True)
    windows = [int(w) for w in args.windows.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    cells: dict[tuple[int, int], dict[str, list[float]]] = {}
    source_seconds = 0.0
    for s, tgt in probe.pairs:
        ref_ix = probe.references[tgt]
        ref = Reference.build([feats[i] for i in ref_ix], [waves[i] for i in ref_ix])
        target_mean = unit(ref.feats.mean(0, keepdims=True))[0]
        for i in probe.sources[s]:
            source_seconds += len(waves[i]) / 16000
            source_mean = unit(feats[i].mean(0, keepdims=True))[0]
            for k in ks:
                conv = convert(feats[i], ref, k, "cpu")
                for w in windows:
                    t = time.perf_counter()
                    audio = overlap_add(ref, conv.idx, len(waves[i]), w)
                    ola = time.perf_counter() - t
                    again = states([audio], [layer])[layer][0]
                    m = min(len(again), len(conv.feats))
                    mean = unit(again.mean(0, keepdims=True))[0]
                    cell = cells.setdefault((w, k), {})
                    for name, v in (("reencoded_cosine", float(np.mean(np.sum(unit(again[:m]) * unit(conv.feats[:m]), 1)))),
                                    ("to_target", float(mean @ target_mean)), ("to_source", float(mean @ source_mean)),
                                    ("match_s", conv.seconds), ("ola_s", ola)):
                        cell.setdefault(name, []).append(v)
    minutes = source_seconds / 60
    rows = []
    for (w, k), cell in sorted(cells.items()):
        rows.append({"window": w, "overlap": 1 - 320 / w, "k": k,
                     **{n: float(np.mean(cell[n])) for n in ("reencoded_cosine", "to_target", "to_source")},
                     "match_s_per_min": float(np.sum(cell["match_s"])) / minutes,
                     "ola_s_per_min": float(np.sum(cell["ola_s"])) / minutes})
    base = next(r for r in rows if r["window"] == 640 and r["k"] == 4)
    print(f"{states.describe()}, layer {layer}; {len(probe.pairs)} speaker pairs, {source_seconds:.0f} s "
          f"of source audio; model forward {60 * encode_s / (sum(len(w) for w in waves) / 16000):.2f} s per minute of audio")
    print("| window (overlap) | k | re-encoded cosine | ratio vs 640/k=4 | to target | to source | matching s/min | overlap-add s/min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['window']} ({100 * r['overlap']:.0f} %) | {r['k']} | {r['reencoded_cosine']:.3f} | "
              f"{r['reencoded_cosine'] / base['reencoded_cosine']:.3f} | {r['to_target']:.3f} | {r['to_source']:.3f} | "
              f"{r['match_s_per_min']:.3f} | {r['ola_s_per_min']:.3f} |")
    print(json.dumps({"layer": layer, "pairs": len(probe.pairs), "rows": rows,
                      "forward_s_per_min": 60 * encode_s / (sum(len(w) for w in waves) / 16000)}))


if __name__ == "__main__":
    main()
