"""HuBERT iterations 1 and 2 against the label-free objectives, data2vec and wav2vec 2.0, at
equal updates, on the same data, model and batches, measured by the probes (ABX, phone,
speaker, PNMI) on held-out speech.

1. HuBERT: ``pretrain iterate --config configs/compare/hubert_it2.yaml`` (the demo's two
   iterations: 500 updates on MFCC k-means labels, then 800 more, continuing iteration 1's
   backbone, on labels from its best layer), with its probe stages on the held-out shards (other
   sentences, another seed) and the baselines (MFCC, log-mel, the untrained model);
2. each label-free arm (``--arms``): ``launch local --nproc 2 pretrain train`` with
   ``configs/small_cpu.yaml`` and ``configs/compare/<arm>.yaml`` on the same training shards,
   1300 updates, checkpoints every 250;
3. ``pretrain probe`` of each arm's checkpoints at 500 and 1300 updates, with the probe settings
   iterate used, on the same held-out shards.

The main table gives the best single layer's figure, as the probe recorded it; the second, the
SUPERB-style learned weighted sum of the layers (fitted by the phone probe, reused by the
others). Compute is counted as optimizer updates at the same batch (``data.max_tokens``), and in
seconds: updates times each objective's median seconds per update, measured in this invocation
by 40-update runs of every arm's config, interleaved three times (``step_time_s``: forward,
backward, update; data2vec's includes its teacher's forward and EMA update, wav2vec 2.0's its
quantizer and distractors), so that all are timed on the same quiet machine; the trainers' own
logged step times are kept in the JSON as ``logged_step_seconds``. HuBERT's offline label
stages (features, k-means, labels; ``labels (s)``) come from iterate's records. A rerun with
the same ``--out`` continues what is there (every step is restartable). The last line is JSON;
``objective_compare.md`` and ``.png`` in ``--out`` hold the tables and a chart (``--table``
writes the tables elsewhere too).

    python experiments/objective_compare.py --out /tmp/objcmp        # about 55 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.pipeline.experiment import BIN, run  # noqa: E402
from pretrain.pipeline.report import best_of  # noqa: E402
from pretrain.stages import resolve  # noqa: E402
from pretrain.utils import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("phone_acc", "per", "abx_within", "abx_across", "speaker_acc", "pnmi")
HEADERS = {"phone_acc": "phone acc (%) ↑", "per": "PER (%) ↓", "abx_within": "ABX within (%) ↓",
           "abx_across": "ABX across (%) ↓", "speaker_acc": "speaker acc (%) ↑", "pnmi": "PNMI ↑"}


def step_seconds(train_dir: Path, upto: int) -> float:
    """Summed step time of a run's first ``upto`` updates, from its logged averages."""
    total, previous = 0.0, 0
    for line in (train_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step_time_s" not in row or row["step"] > upto or row["step"] <= previous:
            continue  # probe rows, and a resumed run's repeated steps
        total += row["step_time_s"] * (row["step"] - previous)
        previous = row["step"]
    return total


def step_costs(out: Path, arms: dict[str, list[str]], nproc: int, log: Path, repeats: int = 3,
               steps: int = 40) -> dict[str, float]:
    """Median seconds per update of each arm's training config (the same model, batch and
    processes) in short runs, interleaved ``repeats`` times: this machine's speed drifts by
    10-30 % over minutes, and interleaving spreads a slow spell over both arms alike."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for attempt in range(repeats):
        for name, train_argv in arms.items():
            run_dir = out / "step_cost" / f"{name}_{attempt}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run([str(BIN / "launch"), "local", "--nproc", str(nproc), "pretrain", "train", *train_argv,
                 f"run_dir={run_dir}", f"optim.max_steps={steps}", "optim.warmup_steps=10", "log.every=5",
                 f"checkpoint.every={steps}"], log)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            times[name] += [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 5]
    return {name: float(sorted(t)[len(t) // 2]) for name, t in times.items()}


def probe_args(iterate_stage: Path) -> list[str]:
    """The ``pretrain probe`` settings of an iterate probe stage, less what is per checkpoint."""
    argv = json.loads(iterate_stage.read_text())["argv"]
    keep, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--checkpoint", "--out"):
            skip = True
            continue
        if arg.startswith("baselines=") or (i < 2 and arg in ("pretrain", "probe")):
            continue
        keep.append(arg)
    return keep


def rows_of(probe: dict, name: str) -> dict:
    """The best single layer's figure of every metric, and the weighted sum's (``weighted_*``)."""
    out = {}
    weighted = probe.get("rows", {}).get(name, {}).get("layers", {}).get("weighted", {})
    for metric in METRICS:
        value, layer = best_of(probe, name, metric)
        out[metric], out[f"{metric}_layer"] = value, layer
        out[f"weighted_{metric}"] = weighted.get(metric)
    return out


def _value(metric: str, v: float | None) -> str:
    return "–" if v is None else (f"{v:.3f}" if metric == "pnmi" else f"{v:.2f}" if v < 10 else f"{v:.1f}")


def table(record: dict) -> str:
    lines = ["Best single layer:", "",
             "| model | updates | training (s) | labels (s) | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "|---" * (4 + len(METRICS)) + "|"]
    for row in record["rows"]:
        cells = [row["model"], str(row.get("updates", "–")),
                 f"{row['train_seconds']:.0f}" if row.get("train_seconds") is not None else "–",
                 f"{row['label_seconds']:.0f}" if row.get("label_seconds") is not None else "–"]
        for m in METRICS:
            v = row.get(m)
            cells.append("–" if v is None else (f"{v:.3f}" if m == "pnmi" else f"{v:.2f}" if v < 10 else f"{v:.1f}")
                         + (f" (L{row[m + '_layer']})" if row.get(m + "_layer") not in (None, "0") and v is not None
                            and row.get("updates") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Learned weighted sum of the layers (the models only):", "",
              "| model | updates | " + " | ".join(HEADERS[m] for m in METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
    for row in record["rows"]:
        if row.get("updates"):
            lines.append(f"| {row['model']} | {row['updates']} | "
                         + " | ".join(_value(m, row.get(f"weighted_{m}")) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """One panel per metric: the baselines in grey, HuBERT in blue, data2vec in orange, wav2vec
    2.0 in green."""
    rows = record["rows"]
    colors = [{"hubert": "tab:blue", "data2vec": "tab:orange", "wav2vec2": "tab:green"}.get(r.get("objective"), "0.6")
              for r in rows]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 4.2), sharey=True)
    for ax, metric in zip(axes, METRICS):
        values = [r.get(metric) or 0.0 for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_title(HEADERS[metric], fontsize=9)
        lo = min(values)
        ax.set_xlim(lo * 0.9 if metric == "pnmi" else 0, max(values) * 1.05)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3f}" if metric == "pnmi" else f" {v:.1f}", va="center", fontsize=7)
    axes[0].set_yticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Held-out probes, best layer: HuBERT, data2vec and wav2vec 2.0 at equal updates "
                 "(experiments/objective_compare.py)", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/objcmp", help="working directory (a rerun continues it)")
    ap.add_argument("--hubert-config", default="configs/compare/hubert_it2.yaml")
    ap.add_argument("--arms", default="data2vec,wav2vec2",
                    help="label-free objectives to compare, each trained with configs/compare/<arm>.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--table", help="also write the Markdown tables here")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "objective_compare.log"
    hubert = out / "hubert"
    seconds = {"hubert_iterate": run([str(BIN / "pretrain"), "iterate", "--config", args.hubert_config,
                                      f"run_dir={hubert}", "--no-progress"], log)}

    _, cfg, _, _ = resolve(["iterate", "--config", args.hubert_config, f"run_dir={hubert}"])
    it1_steps, it2_steps = cfg.iterations[0].max_steps, cfg.iterations[1].max_steps
    total = it1_steps + it2_steps
    arm_argv = {arm: ["--config", str(ROOT / "configs/small_cpu.yaml"), "--config",
                      str(ROOT / "configs" / "compare" / f"{arm}.yaml"), f"data.shards={hubert / 'shards'}"]
                for arm in arms}
    for arm in arms:
        train = out / arm / "train"
        if not (train / "checkpoints" / f"step_{total}").is_dir():
            seconds[f"{arm}_train"] = run([str(BIN / "launch"), "local", "--nproc", str(args.nproc), "pretrain",
                                           "train", *arm_argv[arm], f"run_dir={train}", f"optim.max_steps={total}"],
                                          log)
    # Per-update cost of each objective, timed back to back here (the arms' own runs may have
    # shared the machine with other work): HuBERT on iteration 1's labels, the others as trained.
    it1_train = json.loads((hubert / "stages" / "it1.train.json").read_text())["argv"]
    hubert_argv = [a for a in it1_train[2:] if not a.startswith(("run_dir=", "optim.max_steps="))]
    cost = step_costs(out, {"hubert": hubert_argv, **arm_argv}, args.nproc, log)
    common = probe_args(hubert / "stages" / "it1.probe.json")
    probes: dict[str, dict[int, dict]] = {}
    for arm in arms:
        probes[arm] = {}
        for step in (it1_steps, total):
            dest = out / arm / f"probe_step_{step}"
            if not (dest / "probe.json").is_file():
                seconds[f"{arm}_probe_{step}"] = run(
                    [str(BIN / "pretrain"), "probe", "--checkpoint", str(out / arm / "train" / "checkpoints" / f"step_{step}"),
                     "--out", str(dest), *common, "baselines=none"], log)
            probes[arm][step] = json.loads((dest / "probe.json").read_text())
    it1 = json.loads((hubert / "it1" / "probe" / "probe.json").read_text())
    it2 = json.loads((hubert / "it2" / "probe" / "probe.json").read_text())
    stage = {p.stem: json.loads(p.read_text()).get("seconds") for p in (hubert / "stages").glob("*.json")}
    it1_logged = step_seconds(hubert / "it1" / "train", it1_steps)
    labels_s = {i: sum(stage.get(f"it{i}.{s}") or 0 for s in ("features", "kmeans", "labels")) for i in (1, 2)}
    names = {"data2vec": "data2vec", "wav2vec2": "wav2vec 2.0"}

    def arm_row(arm: str, updates: int) -> dict:
        return {"model": f"{names.get(arm, arm)}, {updates} updates", "objective": arm, "updates": updates,
                "train_seconds": updates * cost[arm], "logged_step_seconds": step_seconds(out / arm / "train", updates),
                **rows_of(probes[arm][updates], "model")}

    rows = [
        {"model": "MFCC (39-dim)", **rows_of(it1, "mfcc")},
        {"model": "log-mel (80-dim)", **rows_of(it1, "logmel")},
        {"model": "untrained model", **rows_of(it1, "untrained")},
        {"model": "HuBERT iteration 1", "objective": "hubert", "updates": it1_steps,
         "train_seconds": it1_steps * cost["hubert"], "label_seconds": labels_s[1],
         "logged_step_seconds": it1_logged, **rows_of(it1, "model")},
        *[arm_row(arm, it1_steps) for arm in arms],
        {"model": "HuBERT iteration 2", "objective": "hubert", "updates": total,
         "train_seconds": total * cost["hubert"], "label_seconds": labels_s[1] + labels_s[2],
         "logged_step_seconds": it1_logged + step_seconds(hubert / "it2" / "train", it2_steps),
         **rows_of(it2, "model")},
        *[arm_row(arm, total) for arm in arms],
    ]
    finals = {}
    for arm in arms:
        logged = [json.loads(line) for line in (out / arm / "train" / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in logged if "loss" in r][-1]
        finals[arm] = {k: v for k, v in last.items()
                       if k in ("step", "loss", "target_var", "pred_var", "ema_decay", "contrastive_loss",
                                "diversity_loss", "acc_contrastive", "temperature") or k.startswith(("code_ppl", "prob_ppl"))}
    record = {"rows": rows, "seconds_per_update": cost,
              "cost_ratio_vs_hubert": {arm: cost[arm] / cost["hubert"] for arm in arms},
              "seconds": seconds, "hubert_stage_seconds": stage, "final_training_metrics": finals,
              "eval_shards": str(hubert / "eval" / "shards"), "nproc": args.nproc}
    text = table(record)
    atomic_write_json(out / "objective_compare.json", record)
    atomic_write_text(out / "objective_compare.md", text)
    plot(record, out / "objective_compare.png")
    if args.table:
        atomic_write_text(Path(args.table), text)
    print(text)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
