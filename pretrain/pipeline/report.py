"""``report.md`` of a ``pretrain iterate`` run, with PNG plots in ``run_dir/report/``: time per
stage, label quality per iteration (against the phone alignments), training loss, masked
accuracy and throughput per iteration. Everything is read from the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pretrain.config.probe import METRICS, PROBE_METRICS
from pretrain.train.metrics import read_jsonl
from pretrain.utils import atomic_write_json, atomic_write_text


def read_metrics(train_dir: Path) -> list[dict]:
    """The training rows of a run's ``metrics.jsonl``, one per step (a resumed run appends: the
    later record of a step wins)."""
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return []

    by_step: dict[int, dict] = {}
    for record in read_jsonl(path):
        if "loss" in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


REFERENCE_CURVES = Path(__file__).resolve().parents[1] / "reference_curves.json"
"""Loss and masked accuracy per step of measured reference runs (``experiments/demo_gain.py``
writes the demo's), drawn faintly behind a run's own: is my curve normal?"""


def training_curves(train_dir: Path) -> dict:
    """A training run's loss and masked accuracy per logged step (a reference curve's form)."""
    rows = read_metrics(train_dir)
    return {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
            "acc_masked": [r.get("acc_masked") for r in rows]}


def write_reference_curves(name: str, entry: dict) -> None:
    """Store ``entry`` ({"description", "curves": {"it<i>": training_curves(...)}}) as the
    reference run ``name`` (a config's ``reference_curves``)."""
    runs = json.loads(REFERENCE_CURVES.read_text()) if REFERENCE_CURVES.is_file() else {}
    runs[name] = entry
    atomic_write_json(REFERENCE_CURVES, runs)


def _reference_curves(cfg) -> tuple[dict, str]:
    """{"reference it<i>": {"step", "loss", "acc_masked"}} of ``cfg.reference_curves``, and a
    sentence saying where they come from (or why there are none)."""
    name = getattr(cfg, "reference_curves", None)
    if not name:
        return {}, ""
    if not REFERENCE_CURVES.is_file():
        return {}, f"Reference curves '{name}' not drawn: {REFERENCE_CURVES} is missing."
    runs = json.loads(REFERENCE_CURVES.read_text())
    if name not in runs:
        return {}, f"Reference curves '{name}' not drawn: {REFERENCE_CURVES.name} has {', '.join(sorted(runs))}."
    ref = runs[name]
    curves = {f"reference {it}": c for it, c in ref["curves"].items()}
    return curves, (f"Faint lines: the reference run '{name}' ({ref['description']}), for telling whether this "
                    "run's curves are normal.")


def _plot(path: Path, series: dict[str, tuple[list, list]], ylabel: str, title: str,
          faint: dict[str, tuple[list, list]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for j, (label, (x, y)) in enumerate((faint or {}).items()):
        ax.plot(x, y, color=f"C{j}", alpha=0.25, lw=2.5, label=label)
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(path: Path, groups: list[str], values: dict[str, list[float]], ylabel: str, title: str,
          horizontal: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, max(3.2, 0.32 * len(groups)) if horizontal else 3.6))
    width = 0.8 / max(len(values), 1)
    pos = np.arange(len(groups))
    for j, (label, v) in enumerate(values.items()):
        if horizontal:
            ax.barh(pos + j * width, v, height=width, label=label)
        else:
            ax.bar(pos + j * width, v, width=width, label=label)
    if horizontal:
        ax.set_yticks(pos + width * (len(values) - 1) / 2, groups)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        ax.set_xticks(pos + width * (len(values) - 1) / 2, groups)
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    if len(values) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _layer(run: Path, i: int, it) -> str:
    """The layer iteration ``i`` clustered; for ``layer: auto``, the one its features recorded."""
    if it.layer != "auto":
        return str(it.layer)
    meta = run / f"it{i}" / "features" / "meta.json"
    if meta.is_file():
        spec = json.loads(meta.read_text()).get("spec", {})
        if spec.get("layer") is not None:
            return f"{spec['layer']} (auto)"
    return "auto"


def write_report(cfg, stages) -> Path:
    """Write ``run_dir/report.md`` and its plots; returns the report's path."""
    run = Path(cfg.run_dir)
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# pretrain iterate: {run.name}", ""]
    lines += _verdict_section(cfg, run, out)

    # ---- time per stage
    records = {}
    for stage in stages:
        path = run / "stages" / f"{stage.name}.json"
        if path.is_file():
            records[stage.name] = json.loads(path.read_text())
    timed = [(s.name, records[s.name]["seconds"]) for s in stages if "seconds" in records.get(s.name, {})]
    lines += ["## Time per stage", "", "| stage | wall time (s) | attempts |", "|---|---|---|"]
    for name, seconds in timed:
        lines.append(f"| {name} | {seconds:.1f} | {len(records[name]['attempts'])} |")
    lines.append(f"| **total** | **{sum(s for _, s in timed):.1f}** | |")
    if timed:
        _bars(out / "stages.png", [n for n, _ in timed], {"seconds": [s for _, s in timed]}, "wall time (s)",
              "time per stage", horizontal=True)
        lines += ["", "![time per stage](report/stages.png)"]

    # ---- label quality
    quality = []
    for i, it in enumerate(cfg.iterations, start=1):
        path = run / f"it{i}" / "quality" / "quality.json"
        if path.is_file():
            quality.append((i, it, json.loads(path.read_text())))
    lines += ["", "## Label quality per iteration", ""]
    if quality:
        lines += ["Against the corpus's phone alignments (`pretrain kmeans quality`): PNMI (HuBERT paper "
                  "§IV-F), phone purity, cluster purity, label usage (perplexity of the cluster "
                  "distribution, of k).", "",
                  "| iteration | features | k | reference | frames | PNMI | phone purity | cluster purity "
                  "| usage perplexity | empty clusters |", "|---|---|---|---|---|---|---|---|---|---|"]
        for i, it, q in quality:
            feats = "MFCC" if it.features == "mfcc" else f"it{i - 1} layer {_layer(run, i, it)}"
            lines.append(f"| {i} | {feats} | {it.k} | {q['reference']} | {q['frames']} | {q['pnmi']:.3f} | "
                         f"{q['phone_purity']:.3f} | {q['cluster_purity']:.3f} | {q['usage_perplexity']:.1f} | "
                         f"{q['empty_clusters']} |")
        _bars(out / "quality.png", [f"it{i}" for i, _, _ in quality],
              {m: [q[m] for _, _, q in quality] for m in ("pnmi", "phone_purity", "cluster_purity")},
              "score", "label quality per iteration")
        lines += ["", "![label quality](report/quality.png)", ""]
        mfcc = next((q for i, it, q in quality if it.features == "mfcc"), None)
        for i, it, q in quality:
            if it.features == "model" and mfcc is not None:
                verdict = "beat" if q["pnmi"] > mfcc["pnmi"] else "did **not** beat"
                lines.append(f"- Iteration {i}'s labels (layer {_layer(run, i, it)}, k={it.k}) {verdict} the MFCC labels "
                             f"(k={cfg.iterations[0].k}) on PNMI: {q['pnmi']:.3f} vs {mfcc['pnmi']:.3f}.")
        lines += ["", "Label usage per iteration: "
                  + ", ".join(f"[it{i}](it{i}/quality/usage.png)" for i, _, _ in quality)
                  + "; phone/cluster co-occurrence: "
                  + ", ".join(f"[it{i}](it{i}/quality/cooccurrence.png)" for i, _, _ in quality) + "."]
    else:
        lines.append("No phone reference (the corpus has no alignments), so no label-quality figures.")

    lines += _probe_section(cfg, run, out)

    # ---- training
    lines += ["", "## Training per iteration", "",
              "| iteration | labels | steps | final loss | final masked accuracy | audio-s per s (median) |",
              "|---|---|---|---|---|---|"]
    losses, accs = {}, {}
    for i, it in enumerate(cfg.iterations, start=1):
        metrics = read_metrics(run / f"it{i}" / "train")
        if not metrics:
            continue
        steps = [m["step"] for m in metrics]
        losses[f"it{i}"] = (steps, [m["loss"] for m in metrics])
        accs[f"it{i}"] = (steps, [m.get("acc_masked", float("nan")) for m in metrics])
        speed = float(np.median([m["audio_s_per_s"] for m in metrics]))
        lines.append(f"| {i} | it{i}_km{it.k} | {steps[-1]} | {metrics[-1]['loss']:.3f} | "
                     f"{metrics[-1].get('acc_masked', float('nan')):.3f} | {speed:.2f} |")
    if losses:
        reference, ref_note = _reference_curves(cfg)
        _plot(out / "loss.png", losses, "loss", "training loss",
              {name: (c["step"], c["loss"]) for name, c in reference.items()})
        _plot(out / "accuracy.png", accs, "masked accuracy", "masked-frame accuracy",
              {name: (c["step"], c["acc_masked"]) for name, c in reference.items()})
        lines += ["", "![loss](report/loss.png) ![accuracy](report/accuracy.png)", "",
                  "Masked accuracy is against each iteration's own labels (k differs), so values of "
                  "different iterations are not comparable with each other."]
        if ref_note:
            lines += ["", ref_note]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _probe_section(cfg, run: Path, out: Path) -> list[str]:
    """The held-out probes of every iteration's model next to the baselines: best single layer
    and the learned weighted sum per probe, and every layer in one plot."""
    records = []
    for i in range(1, len(cfg.iterations) + 1):
        path = run / f"it{i}" / "probe" / "probe.json"
        if path.is_file():
            records.append((i, json.loads(path.read_text())))
    if not records:
        return []
    first = records[0][1]
    metrics = [m for p in first["probes"] if p not in first["skipped"] for m in PROBE_METRICS[p]]
    ev = first["eval"]
    lines = ["", "## Probes on held-out speech", "",
             f"`pretrain probe` on {ev['utterances']} held-out utterances ({ev['seconds']:.0f} s, "
             f"{ev['speakers']} speakers; splits train/dev/test {ev['splits']['train']}/{ev['splits']['dev']}/"
             f"{ev['splits']['test']}), frozen features, linear probes with a learning-rate sweep selected on "
             "probe-dev. Per row: the best single layer (its number in brackets) and SUPERB's learned weighted "
             "sum of all layers. Lower is better for ABX and PER.", ""]
    for p, reason in first["skipped"].items():
        lines.append(f"- probe `{p}` skipped: {reason}")
    if not metrics:
        return lines
    lines += ["| features | " + " | ".join(METRICS[m][0] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]

    def cell(record: dict, name: str, metric: str, weighted: bool = False) -> str:
        if weighted:
            v = record["rows"][name]["layers"]["weighted"].get(metric)
            return "–" if v is None else (f"{v:.3f}" if metric == "pnmi" else f"{v:.1f}")
        v, k = best_of(record, name, metric)
        if v is None:
            return "–"
        text = f"{v:.3f}" if metric == "pnmi" else f"{v:.1f}"
        return text if k == "0" else f"{text} ({k})"

    table = [(label, first, name) for name, label in (("mfcc", "MFCC-39"), ("logmel", "log-mel 80"),
                                                      ("untrained", "untrained")) if name in first["rows"]]
    table += [(f"it{i}", r, "model") for i, r in records if "model" in r["rows"]]
    for label, record, name in table:
        lines.append(f"| {label} | " + " | ".join(cell(record, name, m) for m in metrics) + " |")
        if "weighted" in record["rows"][name]["layers"]:
            lines.append(f"| {label} weighted sum | " + " | ".join(cell(record, name, m, True) for m in metrics) + " |")
    _probe_plot(out / "probes.png", records, metrics)
    lines += ["", "![probes per layer](report/probes.png)", "",
              "Per iteration: " + ", ".join(f"[it{i}](it{i}/probe/probe.md)" for i, _ in records) + "."]
    return lines


def _probe_plot(path: Path, records: list, metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(metrics), 6)
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    first = records[0][1]
    for ax, metric in zip(axes.flat, metrics):
        curves = [(f"it{i}", r["rows"]["model"]) for i, r in records if "model" in r["rows"]]
        if "untrained" in first["rows"]:
            curves.insert(0, ("untrained", first["rows"]["untrained"]))
        for label, row in curves:
            pts = sorted((int(k), v[metric]) for k, v in row["layers"].items()
                         if k.isdigit() and v.get(metric) is not None)
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
        for name, style in (("mfcc", "k:"), ("logmel", "C7:")):
            v = first["rows"].get(name, {}).get("layers", {}).get("0", {}).get(metric)
            if v is not None:
                ax.axhline(v, color=style[:-1], ls=":", label=name)
        ax.set_title(METRICS[metric][0] + (" ↑" if METRICS[metric][1] else " ↓"), fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def best_of(record: dict | None, row: str, metric: str) -> tuple[float | None, str | None]:
    """The best single layer's value and number of a row in a ``probe.json`` (as the probe
    recorded it in ``best``); ``None`` when that row or probe did not run."""
    best = (record or {}).get("best", {}).get(row, {}).get(metric)
    return (None, None) if best is None else (best["value"], str(best["layer"]))


def _pct(v: float) -> str:
    """A percentage with the digits that matter: ABX errors of one or two percent differ in
    the second decimal."""
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _heldout(run: Path, i: int, name: str) -> dict | None:
    path = run / f"it{i}" / name / "quality.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _verdict_section(cfg, run: Path, out: Path) -> list[str]:
    """The report's opening: does the method work on held-out speech? (a) each model
    iteration's labels against MFCC labels at the same k (held-out PNMI); (b) the last
    iteration's model against the one before on the best layer's phone probe and ABX within;
    (c) every iteration's model against MFCC and the untrained twin on the phone probe."""
    n = len(cfg.iterations)
    probes = {i: json.loads(p.read_text()) for i in range(1, n + 1)
              for p in [run / f"it{i}" / "probe" / "probe.json"] if p.is_file()}
    claims: list[tuple[str, bool]] = []
    pnmi_bars: dict[str, float] = {}
    for i, it in enumerate(cfg.iterations, start=1):
        if i == 1:
            continue
        mine = _heldout(run, i, "heldout")
        mfcc = _heldout(run, 1, "heldout") if it.k == cfg.iterations[0].k else _heldout(run, i, "mfcc_heldout")
        if mine and mfcc:
            held = mine["pnmi"] > mfcc["pnmi"]
            pnmi_bars[f"MFCC k={it.k}"] = mfcc["pnmi"]
            pnmi_bars[f"it{i} labels k={it.k}"] = mine["pnmi"]
            claims.append((f"(a) iteration {i}'s labels (it{i - 1} layer {_layer(run, i, it)}, k={it.k}) "
                           f"{'beat' if held else 'did **not** beat'} MFCC labels at the same k on held-out "
                           f"PNMI: {mine['pnmi']:.3f} vs {mfcc['pnmi']:.3f}", held))
    if n > 1 and n in probes and n - 1 in probes:
        for metric, label in (("phone_acc", "frame phone accuracy"), ("abx_within", "ABX within speakers")):
            new, new_l = best_of(probes[n], "model", metric)
            old, old_l = best_of(probes[n - 1], "model", metric)
            if new is None or old is None:
                continue
            held = new > old if metric == "phone_acc" else new < old
            claims.append((f"(b) the iteration-{n} model {'beat' if held else 'did **not** beat'} the "
                           f"iteration-{n - 1} model on {label} (best layers): {_pct(new)} % (layer {new_l}) vs "
                           f"{_pct(old)} % (layer {old_l})", held))
    mfcc_acc, _ = best_of(probes.get(1), "mfcc", "phone_acc")
    untrained_acc, _ = best_of(probes.get(1), "untrained", "phone_acc")
    for i, record in sorted(probes.items()):
        acc, layer = best_of(record, "model", "phone_acc")
        for base, value in (("MFCC", mfcc_acc), ("the untrained twin", untrained_acc)):
            if acc is not None and value is not None:
                held = acc > value
                claims.append((f"(c) the iteration-{i} model {'beat' if held else 'did **not** beat'} {base} on "
                               f"frame phone accuracy: {acc:.1f} % (layer {layer}) vs {value:.1f} %", held))
    if not claims:
        return []
    kept = sum(held for _, held in claims)
    lines = ["## Verdict", "",
             f"On held-out speech (the evaluation shards: other sentences, another seed), {kept} of "
             f"{len(claims)} comparisons held. " + "; ".join(text for text, _ in claims) + ".", ""]
    _verdict_plot(out / "verdict.png", pnmi_bars, probes)
    lines += ["![verdict](report/verdict.png)", ""]
    return lines


def _verdict_plot(path: Path, pnmi_bars: dict, probes: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, probes.get(1), key) for key, name in (("mfcc", "MFCC"), ("logmel", "log-mel"),
                                                          ("untrained", "untrained"))]
    rows += [(f"it{i}", record, "model") for i, record in sorted(probes.items())]
    panels = [("held-out PNMI of the labels ↑", list(pnmi_bars), list(pnmi_bars.values()), "{:.3f}")]
    for metric, title in (("phone_acc", "phone accuracy, best layer (%) ↑"), ("abx_within", "ABX within, best layer (%) ↓")):
        got = [(name, best_of(record, row, metric)[0]) for name, record, row in rows]
        got = [(name, v) for name, v in got if v is not None]
        panels.append((title, [name for name, _ in got], [v for _, v in got], None))
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for ax, (title, names, values, fmt) in zip(axes[0], panels):
        # One colour per iteration in every panel, grey for the baselines.
        colors = [f"C{int(name[2:].split()[0]) - 1}" if name.startswith("it") else "C7" for name in names]
        ax.bar(range(len(names)), values, color=colors)
        if title.startswith("held-out PNMI"):  # the differences are hundredths: no zero baseline
            ax.set_ylim(min(values) - 0.05, max(values) + 0.02)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        for x, v in enumerate(values):
            ax.text(x, v, fmt.format(v) if fmt else _pct(v), ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
