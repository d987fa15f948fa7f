"""data2vec against HuBERT iterations 1 and 2 at equal updates, on the same data, model and
batches, measured by the probes (ABX, phone, speaker, PNMI) on held-out speech.

1. HuBERT: ``pretrain iterate --config configs/compare/hubert_it2.yaml`` (the demo's two
   iterations: 500 updates on MFCC k-means labels, then 800 more, continuing iteration 1's
   backbone, on labels from its best layer), with its probe stages on the held-out shards (other
   sentences, another seed) and the baselines (MFCC, log-mel, the untrained model);
2. data2vec: ``launch local --nproc 2 pretrain train`` with ``configs/small_cpu.yaml`` and
   ``configs/compare/data2vec.yaml`` on the same training shards, 1300 updates, checkpoints every
   250;
3. ``pretrain probe`` of data2vec's checkpoints at 500 and 1300 updates, with the probe settings
   iterate used, on the same held-out shards.

Every figure is the best single layer's, as the probe recorded it. Compute is counted as
optimizer updates at the same batch (``data.max_tokens``), and in seconds: updates times each
objective's median seconds per update, measured in this invocation by 40-update runs of both
arms' configs, interleaved three times (``step_time_s``: forward, backward, update; data2vec's includes its
teacher's forward and EMA update), so that both are timed on the same quiet machine; the
trainers' own logged step times are kept in the JSON as ``logged_step_seconds``. HuBERT's
offline label stages (features, k-means, labels; ``labels (s)``) come from iterate's records.
A rerun with the same ``--out`` continues what is there (every step is restartable). The last
line is JSON; ``objective_compare.md`` and ``.png`` in ``--out`` hold the table and a chart
(``--table`` writes the table elsewhere too).

    python experiments/objective_compare.py --out /tmp/objcmp        # about 35 min on 2 cores
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
    out = {}
    for metric in METRICS:
        value, layer = best_of(probe, name, metric)
        out[metric], out[f"{metric}_layer"] = value, layer
    return out


def table(record: dict) -> str:
    lines = ["| model | updates | training (s) | labels (s) | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
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
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """One panel per metric: the baselines in grey, HuBERT in blue, data2vec in orange."""
    rows = record["rows"]
    colors = [{"hubert": "tab:blue", "data2vec": "tab:orange"}.get(r.get("objective"), "0.6") for r in rows]
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
    fig.suptitle("Held-out probes, best layer: data2vec vs HuBERT at equal updates (experiments/objective_compare.py)",
                 fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/objcmp", help="working directory (a rerun continues it)")
    ap.add_argument("--hubert-config", default="configs/compare/hubert_it2.yaml")
    ap.add_argument("--data2vec-config", default="configs/compare/data2vec.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--table", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "objective_compare.log"
    hubert = out / "hubert"
    seconds = {"hubert_iterate": run([str(BIN / "pretrain"), "iterate", "--config", args.hubert_config,
                                      f"run_dir={hubert}", "--no-progress"], log)}

    _, cfg, _, _ = resolve(["iterate", "--config", args.hubert_config, f"run_dir={hubert}"])
    it1_steps, it2_steps = cfg.iterations[0].max_steps, cfg.iterations[1].max_steps
    total = it1_steps + it2_steps
    d2v = out / "data2vec"
    train = d2v / "train"
    if not (train / "checkpoints" / f"step_{total}").is_dir():
        seconds["data2vec_train"] = run(
            [str(BIN / "launch"), "local", "--nproc", str(args.nproc), "pretrain", "train",
             "--config", str(ROOT / "configs/small_cpu.yaml"), "--config", str(ROOT / args.data2vec_config),
             f"run_dir={train}", f"data.shards={hubert / 'shards'}", f"optim.max_steps={total}"], log)
    # Per-update cost of each objective, timed back to back here (the arms' own runs may have
    # shared the machine with other work): HuBERT on iteration 1's labels, data2vec as trained.
    it1_train = json.loads((hubert / "stages" / "it1.train.json").read_text())["argv"]
    hubert_argv = [a for a in it1_train[2:] if not a.startswith(("run_dir=", "optim.max_steps="))]
    data2vec_argv = ["--config", str(ROOT / "configs/small_cpu.yaml"), "--config", str(ROOT / args.data2vec_config),
                     f"data.shards={hubert / 'shards'}"]
    cost = step_costs(out, {"hubert": hubert_argv, "data2vec": data2vec_argv}, args.nproc, log)
    common = probe_args(hubert / "stages" / "it1.probe.json")
    probes = {}
    for step in (it1_steps, total):
        dest = d2v / f"probe_step_{step}"
        if not (dest / "probe.json").is_file():
            seconds[f"data2vec_probe_{step}"] = run(
                [str(BIN / "pretrain"), "probe", "--checkpoint", str(train / "checkpoints" / f"step_{step}"),
                 "--out", str(dest), *common, "baselines=none"], log)
        probes[step] = json.loads((dest / "probe.json").read_text())
    it1 = json.loads((hubert / "it1" / "probe" / "probe.json").read_text())
    it2 = json.loads((hubert / "it2" / "probe" / "probe.json").read_text())
    stage = {p.stem: json.loads(p.read_text()).get("seconds") for p in (hubert / "stages").glob("*.json")}
    it1_logged = step_seconds(hubert / "it1" / "train", it1_steps)
    labels_s = {i: sum(stage.get(f"it{i}.{s}") or 0 for s in ("features", "kmeans", "labels")) for i in (1, 2)}
    rows = [
        {"model": "MFCC (39-dim)", **rows_of(it1, "mfcc")},
        {"model": "log-mel (80-dim)", **rows_of(it1, "logmel")},
        {"model": "untrained model", **rows_of(it1, "untrained")},
        {"model": "HuBERT iteration 1", "objective": "hubert", "updates": it1_steps,
         "train_seconds": it1_steps * cost["hubert"], "label_seconds": labels_s[1],
         "logged_step_seconds": it1_logged, **rows_of(it1, "model")},
        {"model": f"data2vec, {it1_steps} updates", "objective": "data2vec", "updates": it1_steps,
         "train_seconds": it1_steps * cost["data2vec"], "logged_step_seconds": step_seconds(train, it1_steps),
         **rows_of(probes[it1_steps], "model")},
        {"model": "HuBERT iteration 2", "objective": "hubert", "updates": total,
         "train_seconds": total * cost["hubert"], "label_seconds": labels_s[1] + labels_s[2],
         "logged_step_seconds": it1_logged + step_seconds(hubert / "it2" / "train", it2_steps),
         **rows_of(it2, "model")},
        {"model": f"data2vec, {total} updates", "objective": "data2vec", "updates": total,
         "train_seconds": total * cost["data2vec"], "logged_step_seconds": step_seconds(train, total),
         **rows_of(probes[total], "model")},
    ]
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in metrics if "target_var" in r][-1]
    record = {"rows": rows, "seconds_per_update": cost, "cost_ratio_data2vec_vs_hubert": cost["data2vec"] / cost["hubert"],
              "seconds": seconds, "hubert_stage_seconds": stage,
              "data2vec_final": {k: last[k] for k in ("step", "loss", "target_var", "pred_var", "ema_decay")},
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
