"""The iteration gain across corpora: does a recipe's iteration-1 model give better targets
than MFCC on corpora it was not tuned on? (issue 17's robustness protocol)

For each training corpus of the protocol (they differ in seed, voice subset, sentence length
and speaking rate; each leaves three voices, one per engine, out of training entirely):

1. a training corpus and a held-out corpus (other sentences: seed + 1000; *every* voice, so
   three of them unseen; the same sentence length and rate), shards, MFCC k=100 labels
   (``experiments/iteration_gain.py``'s data stages, through ``pretrain iterate --only``);
2. iteration 1 of the recipe (``launch local``, 2 processes), timed;
3. held-out PNMI at k=100 and k=500 of every layer, next to MFCC, 80-bin log-mel, the model's
   own input (the front end's output) and the untrained twin's layers, each k-means fitted on
   the same training frames; per voice (seen vs unseen) for every row;
4. what could explain a failure: utterance lengths against the crop sizes, the silence share,
   label predictability (final masked accuracy on the k=100 MFCC labels).

A recipe counts only if its best layer beats MFCC at every k on every corpus. The summary
gives mean and spread of the gain over corpora; ``OUT/protocol.json``, ``OUT/protocol.md``,
``OUT/protocol.png``; the last line is JSON.

    python experiments/gain_protocol.py --out /tmp/protocol                       # the recipe
    python experiments/gain_protocol.py --out /tmp/protocol --name short --set optim.max_steps=1000
    python experiments/gain_protocol.py --out /tmp/protocol --corpora c1_short_fast   # one corpus
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.corpus.engines import VOICES  # noqa: E402
from pretrain.data.labels import LabelSet  # noqa: E402
from pretrain.data.shards import read_manifest  # noqa: E402
from pretrain.phones import PHONES, SILENCE  # noqa: E402
from pretrain.pipeline.experiment import (finish_minutes_plot, prepare_data, train,  # noqa: E402
                                         training_arguments, training_summary)
from pretrain.pipeline.report import training_curves, write_reference_curves  # noqa: E402
from pretrain.probe.layer_pnmi import LayerPnmi  # noqa: E402
from pretrain.stages import resolve  # noqa: E402
from pretrain.utils import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402

CORPORA = {
    # name: seed, voices left out of training (one per engine), clauses per sentence, duration factor
    "c0_base": {"seed": 0, "unseen": ["festival-ked", "flite-rms", "espeak-f4"], "max_clauses": 3, "stretch": 1.0},
    "c1_short_fast": {"seed": 1, "unseen": ["festival-kal", "flite-awb", "espeak-klatt"], "max_clauses": 1,
                      "stretch": 0.85},
    "c2_long_slow": {"seed": 2, "unseen": ["festival-slt", "flite-kal16", "espeak-m3"], "max_clauses": 5,
                     "stretch": 1.2},
}


def train_config_fields(config: Path, overrides: list[str]) -> dict:
    """The resolved training config's data crop sizes (what utterance lengths are judged by)."""
    _, cfg, _, _ = resolve(["train", "--config", str(config), "run_dir=x", "data.shards=x", "data.labels=[x]",
                            *overrides])
    return {"min_seconds": cfg.data.min_sample_size / 16000, "max_seconds": cfg.data.max_sample_size / 16000}


def corpus_stats(shards: Path, crops: dict) -> dict:
    """Utterance lengths against the crops, and the share of silence frames (phones50)."""
    manifest = read_manifest(shards)
    seconds = []
    phones = LabelSet(shards, "phones50")
    sil = PHONES.index(SILENCE)
    frames = silent = 0
    for shard in manifest["shards"]:
        for key, y in phones.load_shard(shard["name"]).items():
            seconds.append(len(y) / 50)
            frames += len(y)
            silent += int((y == sil).sum())
    s = np.array(seconds)
    return {"utterances": len(s), "hours": float(s.sum() / 3600), "mean_seconds": float(s.mean()),
            "median_seconds": float(np.median(s)), "p10_seconds": float(np.percentile(s, 10)),
            "p90_seconds": float(np.percentile(s, 90)),
            "share_shorter_than_min_crop": float((s < crops["min_seconds"]).mean()),
            "share_longer_than_max_crop": float((s > crops["max_seconds"]).mean()),
            "silence_share": silent / frames}


def best(table: dict, k: int, prefix: str = "layer") -> tuple[str, float]:
    rows = {name: row[k] for name, row in table.items() if name.startswith(prefix)}
    name = max(rows, key=rows.get)
    return name, rows[name]


def run_corpus(name: str, spec: dict, args, config: Path, crops: dict, log: Path) -> dict:
    out = Path(args.out) / name
    voices = [v for v in VOICES if v not in spec["unseen"]]
    t0 = time.perf_counter()
    shards, heldout = prepare_data(out, args.hours, args.heldout_hours, spec["seed"], log, voices,
                                   spec["max_clauses"], spec["stretch"])
    data_s = time.perf_counter() - t0
    run_dir = train(out, args.name, config, args.set, shards, args.nproc, log)
    t1 = time.perf_counter()
    ev = LayerPnmi(shards, heldout, args.ks, args.sample_frames, spec["seed"], args.threads)
    ckpt = run_dir / "checkpoints"
    final = ckpt / (ckpt / "latest").read_text().strip()
    per_voice = dict(ev.per_voice)
    table = {**ev.baselines, **ev.layers(final, per_voice=per_voice)}
    untrained = ev.untrained(final)
    curve = []
    if args.curve:
        kept = sorted((p for p in ckpt.glob("step_*") if (p / "model.pt").is_file() and p != final),
                      key=lambda p: int(p.name[5:]))
        for path in kept:
            curve.append({"step": int(path.name[5:]), "table": ev.layers(path)})
    eval_s = time.perf_counter() - t1
    summary = training_summary(run_dir)
    for point in curve:
        point["minutes"] = summary["step_minutes"].get(point["step"])
    front = next(n for n in table if n.startswith("input_"))
    per_k = {}
    for k in args.ks:
        layer, value = best(table, k)
        mfcc = max(table["mfcc_50hz"][k], table["mfcc_100hz"][k])
        _, untrained_best = best(untrained, k)
        seen = [v for v in voices if v in ev.by_voice]
        unseen = [v for v in spec["unseen"] if v in ev.by_voice]

        def mean_over(row: str, group: list[str]) -> float:
            return float(np.mean([per_voice[row][k][v] for v in group]))

        per_k[k] = {"best_layer": int(layer[5:]), "pnmi_best_layer": value, "pnmi_mfcc": mfcc,
                    "pnmi_logmel": table["logmel_50hz"][k], "pnmi_input": table[front][k],
                    "pnmi_untrained_best": untrained_best, "gain": value - mfcc, "beats_mfcc": value > mfcc,
                    "beats_all_baselines": value > max(mfcc, table["logmel_50hz"][k], table[front][k],
                                                       untrained_best),
                    "seen_voices": {"best_layer": mean_over(layer, seen), "mfcc": mean_over("mfcc_50hz", seen)},
                    "unseen_voices": {"best_layer": mean_over(layer, unseen), "mfcc": mean_over("mfcc_50hz", unseen)}}
    return {"corpus": name, **spec, "train_voices": voices, "stats": corpus_stats(shards, crops),
            "heldout_stats": corpus_stats(heldout, crops), "table": table, "untrained": untrained,
            "per_voice": per_voice, "per_k": per_k, "curve": curve,
            "train_minutes": (summary["train_seconds"] or 0) / 60, "steps": summary["steps"],
            "acc_masked": summary.get("acc_masked"), "audio_s_per_s": summary["audio_s_per_s"],
            "data_seconds": data_s, "eval_seconds": eval_s, "run_dir": str(run_dir)}


def report(results: list[dict], ks: list[int], args) -> tuple[dict, str]:
    summary = {}
    for k in ks:
        gains = [r["per_k"][k]["gain"] for r in results]
        summary[k] = {"gain_mean": statistics.fmean(gains),
                      "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                      "gain_min": min(gains), "gain_max": max(gains),
                      "wins_every_corpus": all(r["per_k"][k]["beats_mfcc"] for r in results)}
    passed = all(v["wins_every_corpus"] for v in summary.values())
    lines = [f"# Iteration-gain protocol: {args.name}", "",
             f"Config `{args.config}` {' '.join(args.set)}; {args.hours} h training corpora, {args.heldout_hours} h "
             "held-out corpora (other sentences, every voice). Held-out PNMI; best layer vs MFCC "
             "(the better of its 50 Hz and 100 Hz grids).", "",
             "| corpus | minutes | masked acc | k | MFCC | log-mel | input | untrained (best) | best layer | gain "
             "| unseen voices: layer / MFCC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for k in ks:
            v = r["per_k"][k]
            lines.append(f"| {r['corpus']} | {r['train_minutes']:.1f} | {r['acc_masked'] or 0:.3f} | {k} | "
                         f"{v['pnmi_mfcc']:.3f} | {v['pnmi_logmel']:.3f} | {v['pnmi_input']:.3f} | "
                         f"{v['pnmi_untrained_best']:.3f} | {v['pnmi_best_layer']:.3f} ({v['best_layer']}) | "
                         f"{v['gain']:+.3f} | {v['unseen_voices']['best_layer']:.3f} / "
                         f"{v['unseen_voices']['mfcc']:.3f} |")
    lines += ["", "| k | gain mean | gain std | min | max | wins on every corpus |", "|---|---|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['gain_mean']:+.3f} | {v['gain_std']:.3f} | {v['gain_min']:+.3f} | "
                     f"{v['gain_max']:+.3f} | {'yes' if v['wins_every_corpus'] else 'no'} |")
    lines += ["", "| corpus | utterances | mean s | p10–p90 s | < min crop | > max crop | silence share |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["stats"]
        lines.append(f"| {r['corpus']} | {st['utterances']} | {st['mean_seconds']:.1f} | {st['p10_seconds']:.1f}–"
                     f"{st['p90_seconds']:.1f} | {st['share_shorter_than_min_crop']:.1%} | "
                     f"{st['share_longer_than_max_crop']:.1%} | {st['silence_share']:.1%} |")
    lines += ["", f"**Verdict: {'passes' if passed else 'fails'}** (best layer above MFCC at every k on every corpus)."]
    return {"summary": summary, "passed": passed}, "\n".join(lines) + "\n"


def plot(results: list[dict], ks: list[int], path: Path) -> None:
    rows = [("MFCC", "pnmi_mfcc", "k"), ("log-mel", "pnmi_logmel", "C7"), ("input", "pnmi_input", "C8"),
            ("untrained", "pnmi_untrained_best", "C5"), ("best layer", "pnmi_best_layer", "C0")]
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 3.8), squeeze=False)
    x = np.arange(len(results))
    width = 0.8 / len(rows)
    for ax, k in zip(axes[0], ks):
        for j, (label, key, color) in enumerate(rows):
            ax.bar(x + j * width, [r["per_k"][k][key] for r in results], width, label=label, color=color,
                   alpha=0.85)
        ax.set_xticks(x + width * (len(rows) - 1) / 2, [r["corpus"] for r in results], fontsize=8)
        lo = min(r["per_k"][k][key] for r in results for _, key, _ in rows)
        ax.set_ylim(lo - 0.05, None)
        ax.set_title(f"held-out PNMI, k = {k}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def curve_points(result: dict, k: int) -> list[tuple[float, float]]:
    """(training minutes, best layer's PNMI minus MFCC's) at every scored checkpoint."""
    mfcc = result["per_k"][k]["pnmi_mfcc"]
    points = [(p["minutes"], max(row[k] for name, row in p["table"].items() if name.startswith("layer")) - mfcc)
              for p in result["curve"]]
    minutes = training_summary(Path(result["run_dir"]))["step_minutes"][result["steps"]]
    return points + [(minutes, result["per_k"][k]["gain"])]


def load_result(path: Path) -> dict:
    """A corpus's saved result with its k keys back as integers (JSON made them strings)."""
    result = json.loads(path.read_text())
    result["per_k"] = {int(k): v for k, v in result["per_k"].items()}
    for point in result["curve"]:
        point["table"] = {name: {int(k): v for k, v in row.items()} for name, row in point["table"].items()}
    return result


def plot_curves(results: list[dict], ks: list[int], path: Path) -> None:
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for r in results:
            pts = curve_points(r, k)
            ax.plot([m for m, _ in pts], [g for _, g in pts], marker="o", ms=3, label=r["corpus"])
        ax.axhline(0, color="k", ls="--", lw=1)
    finish_minutes_plot(fig, axes, ks, "best layer PNMI − MFCC PNMI (held out)", path)


def main(argv: list[str] | None = None) -> int:
    ap = training_arguments(__doc__, "run name (one run per corpus under OUT/<corpus>/runs)", "/tmp/gain_protocol")
    ap.add_argument("--corpora", default=",".join(CORPORA), help=f"which of {', '.join(CORPORA)}")
    ap.add_argument("--heldout-hours", type=float, default=0.3, help="held-out corpus hours")
    ap.add_argument("--nproc", type=int, default=2, help="training processes")
    ap.add_argument("--ks", default="100,500", help="cluster counts")
    ap.add_argument("--sample-frames", type=int, default=150_000, help="training frames each k-means is fitted on")
    ap.add_argument("--threads", type=int, default=2, help="threads of the evaluation (torch and FAISS)")
    ap.add_argument("--curve", action="store_true", help="also score every kept checkpoint (the budget curve)")
    ap.add_argument("--write-reference", action="store_true",
                    help="store the first corpus's training curves as the 'small_cpu' reference curves")
    ap.add_argument("--report-only", action="store_true",
                    help="no training or scoring: summarize the per-corpus results already in OUT")
    args = ap.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.corpora.split(",")
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        ap.error(f"unknown corpora {unknown}; choose from {', '.join(CORPORA)}")
    config = Path(args.config).resolve()
    crops = train_config_fields(config, args.set)
    results = []
    for name in names:
        saved = out / name / f"{args.name}.json"
        if args.report_only:
            result = load_result(saved)
        else:
            result = run_corpus(name, CORPORA[name], args, config, crops, out / f"{name}.commands.log")
            atomic_write_json(saved, result)
        results.append(result)
    if args.write_reference:
        first = results[0]
        write_reference_curves("small_cpu", {
            "description": f"configs/small_cpu.yaml on the protocol's {first['corpus']} corpus, iteration 1, "
                           f"{first['train_minutes']:.1f} min on 2 CPU cores (experiments/gain_protocol.py)",
            "curves": {"it1": training_curves(Path(first["run_dir"]))}})
    verdict, md = report(results, args.ks, args)
    atomic_write_text(out / f"protocol_{args.name}.md", md)
    plot(results, args.ks, out / f"protocol_{args.name}.png")
    if any(r["curve"] for r in results):
        plot_curves(results, args.ks, out / f"protocol_{args.name}_curve.png")
    print(md)
    record = {"name": args.name, "config": args.config, "overrides": args.set, **verdict,
              "corpora": {r["corpus"]: {"per_k": r["per_k"], "train_minutes": r["train_minutes"],
                                        "steps": r["steps"], "acc_masked": r["acc_masked"], "stats": r["stats"],
                                        "table": r["table"], "untrained": r["untrained"],
                                        "curve": {str(k): curve_points(r, k) for k in args.ks}}
                          for r in results}}
    atomic_write_json(out / f"protocol_{args.name}.json", record)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
