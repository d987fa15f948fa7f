"""What the probe suite costs: ``pretrain probe`` on one checkpoint of the small-compute recipe's
model (``configs/small_cpu.yaml``: Fbank front end, 6 x 256 Transformer) with the demo's
evaluation set, and the ABX kernel's DTW pairs per second, numba against plain numpy.

1. The demo's evaluation set: ``pretrain corpus synth`` with the demo's settings
   (``configs/demo.yaml``: 0.1 h, seed 0 + 1000, up to 3 clauses) and ``pretrain shards build``
   (reused when ``--out`` has it).
2. ``pretrain probe`` (every probe: ABX, frame phone + CTC, speaker, PNMI; every layer and the
   weighted sum; MFCC, log-mel and the untrained twin), timed as a whole command in a fresh
   process. Without ``--checkpoint`` the model is the recipe's architecture at random
   initialization: the cost does not depend on the weights.
3. DTW: the triphone items of the evaluation set on one layer of the model, all within-context
   pairs through the probe's numba kernel (parallel over pairs), against ``dtw_reference``
   (numpy distances, Python recursion) on a seeded sample of the same pairs.

Last line JSON: ``probe_seconds``, ``dtw_speedup`` (numba pairs/s over numpy pairs/s),
and the parts.

    python benchmarks/probe_cost.py [--checkpoint RUN/checkpoints/step_3000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
import yaml

from pretrain.config import load_config
from pretrain.config.train import TrainConfig
from pretrain.model.checkpoint import save_model
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.model.states import LayerStates
from pretrain.probe.abx import build_items, context_distances, dtw_pairs, dtw_reference, scorable_contexts, unit_rows
from pretrain.probe.data import load_eval_set
from pretrain.probe.features import offsets_of
from pretrain.resources import config_path

BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def eval_shards(out: Path) -> Path:
    demo = yaml.safe_load(config_path("configs/demo.yaml").read_text())
    hours = demo["eval"]["synth_hours"]
    seed = demo["corpus"].get("synth_seed", 0) + demo["eval"].get("synth_seed_offset", 1000)
    corpus, shards = out / "eval_corpus", out / "eval_shards"
    if not (shards / "manifest.json").is_file():
        run([str(BIN / "pretrain"), "corpus", "synth", "--out", str(corpus), "--hours", str(hours), "--seed", str(seed),
             "--jobs", "2", "--no-progress"])
        run([str(BIN / "pretrain"), "shards", "build", "--input", str(corpus), "--out", str(shards), "--per-shard", "32",
             "--jobs", "2", "--no-progress"])
    return shards


def untrained_recipe_model(out: Path) -> Path:
    cfg = load_config(TrainConfig, [config_path("configs/small_cpu.yaml")], ["run_dir=x", "data.shards=x",
                                                                            "data.labels=[it1_km100]"])
    torch.manual_seed(0)
    path = out / "small_cpu_untrained" / "model.pt"
    save_model(path, HubertPretrain(cfg.model, [LabelSpec("it1_km100", 100, 100)]))
    return path


def dtw_rates(checkpoint: Path, shards: Path, threads: int, sample: int) -> dict:
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    es = load_eval_set(shards)
    waves = [u.audio for u in es.utterances]
    offsets = offsets_of(waves)
    feats = np.concatenate(LayerStates(checkpoint)(waves, [3])[3])
    speakers = {s: i for i, s in enumerate(es.speakers)}
    items = build_items([u.phones for u in es.utterances], offsets, [speakers[u.speaker] for u in es.utterances],
                        es.silence, 5, 0)
    contexts = scorable_contexts(items)
    dtw_pairs(unit_rows(feats[:4]), np.array([0]), np.array([2]), np.array([[0, 0]]))  # compile first
    lookup = context_distances(feats, items, contexts)
    pairs = np.array(sorted({(min(a, b), max(a, b)) for a, b in lookup}))
    unit = unit_rows(feats)
    t = time.perf_counter()
    direct = dtw_pairs(unit, items.starts, items.ends, pairs)
    pair_kernel = time.perf_counter() - t
    chosen = np.random.default_rng(0).choice(len(pairs), min(sample, len(pairs)), replace=False)
    t = time.perf_counter()
    slow = [dtw_reference(feats[items.starts[a]:items.ends[a]], feats[items.starts[b]:items.ends[b]])
            for a, b in pairs[chosen]]
    numpy_seconds = time.perf_counter() - t
    err = max(abs(s - direct[i]) for s, i in zip(slow, chosen))
    n = len(pairs)
    return {"pairs": n, "dim": int(feats.shape[1]), "numpy_pairs_sampled": len(chosen),
            "numba_pairs_per_s": n / pair_kernel,
            "numpy_pairs_per_s": len(chosen) / numpy_seconds, "max_abs_diff": float(err)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a small_cpu checkpoint (default: the recipe's model, untrained)")
    ap.add_argument("--out", default="/tmp/probe_cost", help="work folder (the eval set is reused)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the probe and of the DTW kernels")
    ap.add_argument("--numpy-pairs", type=int, default=300, help="pairs timed with the numpy reference")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = eval_shards(out)
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else untrained_recipe_model(out)
    cmd = [str(BIN / "pretrain"), "probe", "--checkpoint", str(checkpoint), "--eval-shards", str(shards),
           "--out", str(out / "probe"), f"threads={args.threads}", "--no-progress"]
    seconds = run(cmd)
    record = json.loads((out / "probe" / "probe.json").read_text())
    dtw = dtw_rates(checkpoint, shards, args.threads, args.numpy_pairs)
    speedup = dtw["numba_pairs_per_s"] / dtw["numpy_pairs_per_s"]
    print((out / "probe" / "probe.md").read_text())
    print(f"pretrain probe: {seconds:.1f} s wall for the whole suite (target <= 120 s); inside: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in record["seconds"].items()))
    print(f"eval set: {record['eval']['utterances']} utterances, {record['eval']['seconds']:.0f} s of audio")
    print(f"DTW over {dtw['pairs']} within-context item pairs of layer 3 ({dtw['dim']}-dim): numba "
          f"{dtw['numba_pairs_per_s']:.0f} pairs/s ({args.threads} threads), numpy reference "
          f"{dtw['numpy_pairs_per_s']:.1f} "
          f"pairs/s ({dtw['numpy_pairs_sampled']} pairs); speedup {speedup:.0f}x; largest difference "
          f"{dtw['max_abs_diff']:.1e}")
    print(json.dumps({"probe_seconds": round(seconds, 2), "dtw_speedup": round(speedup, 1),
                      "probe_parts": record["seconds"], "eval": record["eval"], "dtw": dtw,
                      "checkpoint": str(checkpoint), "threads": args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
