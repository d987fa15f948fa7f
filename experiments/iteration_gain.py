"""Does iteration 1's model give better targets than MFCC? The HuBERT iteration gain, measured.

Runs HuBERT's first iteration with a training config (default ``configs/small_cpu.yaml``) on a
freshly synthesized, seeded corpus, then clusters MFCC and every Transformer layer of the
trained model, and scores each clustering by PNMI against the phone alignments of a *held-out*
corpus (other sentences, same voices, synthesized with another seed):

1. ``pretrain iterate --only STAGE`` for the data stages: corpus, shards, MFCC features,
   k-means (k=100), labels ``it1_km100`` (the pipeline's own stages and bookkeeping, so a rerun
   skips what is done);
2. ``launch local --nproc N pretrain train`` with the config and ``--set`` overrides into
   ``OUT/runs/NAME`` (training time is the wall time of that command, start-up included; a
   rerun after an interruption resumes the run, and then only the last attempt is timed);
3. held-out corpus and shards (``pretrain corpus synth``, ``pretrain shards build``);
4. k-means (FAISS, the pipeline's ``kmeans``) of MFCC, 80-bin log-mel, the model's own input
   (the front end's output) and every layer of every kept checkpoint, each at k=100 and k=500, fitted
   on the frames of the same training utterances; held-out frames assigned and scored; the
   checkpoints give the budget curve (``--no-curve``: the final one only).

Every layer is compared with MFCC on the *same* 50 Hz frames (MFCC's 100 Hz frame ``2i`` has
the centre of 50 Hz frame ``i``); MFCC's PNMI on its own 100 Hz grid is printed too, and the
verdict uses the larger of the two. The last line is JSON: ``pnmi_mfcc``, ``pnmi_best_layer``
and ``best_layer`` at k=100, everything else per k, the budget and the verdict.

    python experiments/iteration_gain.py                      # the recipe, ~15 min on 2 cores
    python experiments/iteration_gain.py --set optim.max_steps=500 --name short
    python experiments/iteration_gain.py --eval-only OUT/runs/NAME   # score a trained run again
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.pipeline.experiment import (finish_minutes_plot, prepare_data, train, training_arguments,
                                         training_summary)
from pretrain.probe.layer_pnmi import LayerPnmi
from pretrain.utils import atomic_write_json


def plot_curve(curve: list[dict], mfcc: dict, ks: list[int], path: Path) -> None:
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4), squeeze=False)
    layers = sorted({name for point in curve for name in point["table"] if name.startswith("layer")},
                    key=lambda n: int(n[5:]))
    for ax, k in zip(axes[0], ks):
        x = [point["minutes"] for point in curve]
        for name in layers:
            ax.plot(x, [point["table"][name][k] for point in curve], marker="o", ms=3, label=name)
        ax.axhline(max(mfcc["mfcc_50hz"][k], mfcc["mfcc_100hz"][k]), color="k", ls="--", label="MFCC")
        front = next((name for name in curve[-1]["table"] if name.startswith("input_")), None)
        if front:  # the model's own input: fixed, so one value
            ax.axhline(curve[-1]["table"][front][k], color="grey", ls=":", label=f"{front} (model input)")
    finish_minutes_plot(fig, axes, ks, "held-out PNMI", path)


def main(argv: list[str] | None = None) -> int:
    ap = training_arguments(__doc__, "run name under OUT/runs", "/tmp/iteration_gain")
    ap.add_argument("--heldout-hours", type=float, default=0.3, help="held-out corpus hours")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed (held-out: seed + 1000)")
    ap.add_argument("--nproc", type=int, default=2, help="training processes")
    ap.add_argument("--ks", default="100,500", help="cluster counts")
    ap.add_argument("--sample-frames", type=int, default=150_000,
                    help="50 Hz training frames the k-means of each layer (and MFCC) is fitted on")
    ap.add_argument("--threads", type=int, default=2, help="threads of the evaluation (torch and FAISS)")
    ap.add_argument("--eval-only", metavar="RUN_DIR", help="score this trained run; no training")
    ap.add_argument("--checkpoint", help="score this model file or checkpoint folder instead of the run's latest")
    ap.add_argument("--no-curve", dest="curve", action="store_false",
                    help="score only the final checkpoint, not every kept one")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    ks = [int(k) for k in args.ks.split(",")]

    t0 = time.perf_counter()
    shards, heldout = prepare_data(out, args.hours, args.heldout_hours, args.seed, log)
    t_data = time.perf_counter() - t0
    if args.eval_only:
        run_dir = Path(args.eval_only).resolve()
    else:
        run_dir = train(out, args.name, Path(args.config).resolve(), args.set, shards, args.nproc, log)
    t1 = time.perf_counter()
    evaluator = LayerPnmi(shards, heldout, ks, args.sample_frames, args.seed, args.threads)
    summary = training_summary(run_dir)
    if args.checkpoint:
        checkpoints = [Path(args.checkpoint)]
    else:
        ckpt = run_dir / "checkpoints"
        checkpoints = [ckpt / (ckpt / "latest").read_text().strip()]
        if args.curve:  # every kept checkpoint, oldest first, the final one last
            kept = sorted((p for p in ckpt.glob("step_*") if (p / "model.pt").is_file()),
                          key=lambda p: int(p.name[5:]))
            checkpoints = [p for p in kept if p != checkpoints[0]] + checkpoints
    curve = []
    for path in checkpoints:
        step = int(path.name[5:]) if path.name.startswith("step_") and path.is_dir() else None
        table = evaluator.layers(path)
        curve.append({"checkpoint": str(path), "step": step, "minutes": summary["step_minutes"].get(step),
                      "acc_masked": summary["acc_masked_at"].get(step), "table": table,
                      "verdict": evaluator.verdict(table)})
    t_eval = time.perf_counter() - t1

    final = curve[-1]
    table = {**evaluator.baselines, **final["table"]}
    layers = sum(name.startswith("layer") for name in final["table"])
    front = next(name for name in final["table"] if name.startswith("input_"))
    print(f"\nrun {run_dir}: {summary['steps']} steps, {(summary['train_seconds'] or 0) / 60:.1f} min training "
          f"(wall, start-up included), {summary['audio_s_per_s']:.1f} audio-s/s, "
          f"{summary['audio_hours_seen'] or 0:.1f} h of audio seen, final masked accuracy "
          f"{summary.get('acc_masked') or 0:.3f}")
    print(f"held-out PNMI ({evaluator.heldout_frames} frames at 50 Hz; k-means fitted on "
          f"{evaluator.train_frames} training frames at 50 Hz)")
    print("features       " + "".join(f"  k={k:<6}" for k in ks))
    for row in ["mfcc_100hz", "mfcc_50hz", "logmel_50hz", front, *[f"layer{i}" for i in range(1, layers + 1)]]:
        print(f"{row:<14} " + "".join(f"  {table[row][k]:.3f}  " for k in ks))
    if len(curve) > 1:
        print("\nbudget curve (best layer per k; MFCC " +
              ", ".join(f"k={k}: {final['verdict'][k]['pnmi_mfcc']:.3f}" for k in ks) + ")")
        print("step    minutes  acc_masked  " + "".join(f"  k={k}: best layer (PNMI)" for k in ks))
        for point in curve:
            cells = "".join(f"  {point['verdict'][k]['best_layer']:>12} ({point['verdict'][k]['pnmi_best_layer']:.3f})"
                            for k in ks)
            print(f"{point['step']!s:<7} {point['minutes'] or 0:7.1f}  {point['acc_masked'] or 0:10.3f}  {cells}")
        if all(point["minutes"] is not None for point in curve):
            plot_curve(curve, evaluator.baselines, ks, run_dir / "iteration_gain.png")
            print(f"plot: {run_dir / 'iteration_gain.png'}")
    verdict = final["verdict"]
    k0 = ks[0]
    record = {"pnmi_mfcc": verdict[k0]["pnmi_mfcc"], "pnmi_best_layer": verdict[k0]["pnmi_best_layer"],
              "best_layer": verdict[k0]["best_layer"], "k": k0,
              "beats_mfcc": {str(k): v["gain"] > 0 for k, v in verdict.items()},
              "per_k": {str(k): v for k, v in verdict.items()}, "table": table,
              "train_minutes": (summary["train_seconds"] or 0) / 60, "steps": summary["steps"],
              "audio_s_per_s": summary["audio_s_per_s"], "audio_hours_seen": summary["audio_hours_seen"],
              "acc_masked": summary.get("acc_masked"),
              "curve": [{k: v for k, v in point.items() if k != "verdict"} for point in curve],
              "config": args.config, "overrides": args.set, "corpus_hours": args.hours,
              "heldout_hours": args.heldout_hours, "seed": args.seed, "data_seconds": t_data,
              "eval_seconds": t_eval, "run_dir": str(run_dir), "checkpoint": final["checkpoint"]}
    if not args.checkpoint:
        atomic_write_json(run_dir / "iteration_gain.json", record)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
