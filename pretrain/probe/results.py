"""Reading and showing a probe record (``probe.json``): the best layer per row and metric,
the Markdown table, the plot, the flat scalars dashboards get, and the layer ``layer: auto``
picks. JSON and (for the plot) matplotlib only: what reads results (the trainer's probe
scheduler, ``features model`` choosing its layer, the report) does not load torch and numba.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config.probe import METRICS, PROBE_METRICS
from pretrain.utils import PretrainError, atomic_savefig

FORMAT_VERSION = 1


def best_layers(results: dict) -> dict:
    """Per row with several layers, per metric: the best single layer and its value."""
    best: dict = {}
    for name, row in results.items():
        numbered = {k: v for k, v in row["layers"].items() if k.isdigit()}
        if not numbered:
            continue
        for metric, (_, higher) in METRICS.items():
            have = {k: v[metric] for k, v in numbered.items() if v.get(metric) is not None}
            if have:
                k = (max if higher else min)(have, key=have.get)
                best.setdefault(name, {})[metric] = {"layer": int(k), "value": have[k]}
    return best


def _fmt(v, metric: str) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if metric == "pnmi" else f"{v:.1f}"


def table_rows(record: dict) -> list[tuple[str, dict]]:
    out = []
    for name, row in record["rows"].items():
        for layer, values in row["layers"].items():
            label = name if layer == "0" else (f"{name} weighted sum" if layer == "weighted" else f"{name} layer {layer}")
            out.append((label, values))
    return out


def markdown(record: dict) -> str:
    metrics = [m for p in record["probes"] if p not in record["skipped"] for m in PROBE_METRICS[p]]
    ev = record["eval"]
    lines = [f"# Probes{' of ' + record['checkpoint'] if record['checkpoint'] else ''}", "",
             f"Evaluation set {ev['shards']}: {ev['utterances']} utterances ({ev['seconds']:.0f} s, "
             f"{ev['speakers']} speakers), splits train/dev/test {ev['splits']['train']}/{ev['splits']['dev']}/"
             f"{ev['splits']['test']}, reference {ev['reference']}. Lower is better for ABX and PER.", ""]
    if metrics:
        lines += ["| features | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for label, values in table_rows(record):
            lines.append(f"| {label} | " + " | ".join(_fmt(values.get(m), m) for m in metrics) + " |")
    for p, reason in record["skipped"].items():
        lines.append(f"- probe `{p}` skipped: {reason}")
    weights = record["rows"].get("model", {}).get("layers", {}).get("weighted", {}).get("layer_weights")
    if weights:
        lines += ["", "Weighted sum, learned layer weights (frame phone probe): "
                  + ", ".join(f"layer {i}: {w:.2f}" for i, w in enumerate(weights, 1))]
    lines += ["", f"Probe time {record['seconds']['total']:.1f} s."]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    """One panel per metric (six to a row): the model's (and untrained twin's) curve over
    layers, baselines as horizontal lines, the weighted sum as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for p in record["probes"] if p not in record["skipped"] for m in PROBE_METRICS[p]]
    if not metrics:
        return
    cols = min(len(metrics), 6)
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    colors = {"model": "C0", "untrained": "C1", "mfcc": "k", "logmel": "grey"}
    for ax, metric in zip(axes.flat, metrics):
        for name, row in record["rows"].items():
            color = colors.get(name, None)
            numbered = sorted((int(k), v.get(metric)) for k, v in row["layers"].items() if k.isdigit())
            if len(numbered) == 1 and numbered[0][0] == 0:
                if numbered[0][1] is not None:
                    ax.axhline(numbered[0][1], color=color, ls=":", label=name)
                continue
            xs = [k for k, v in numbered if v is not None]
            ax.plot(xs, [v for _, v in numbered if v is not None], marker="o", ms=3, color=color, label=name)
            wsum = row["layers"].get("weighted", {}).get(metric)
            if wsum is not None:
                ax.axhline(wsum, color=color, ls="--", lw=0.8, label=f"{name} weighted sum")
        ax.set_title(METRICS[metric][0] + (" ↑" if METRICS[metric][1] else " ↓"), fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)


def probe_metrics_flat(record: dict) -> dict[str, float]:
    """Scalars for dashboards: ``probe/<row>/<layer>/<metric>`` plus ``probe/best/<metric>``."""
    flat = {}
    for name, row in record["rows"].items():
        for layer, values in row["layers"].items():
            for metric in METRICS:
                if values.get(metric) is not None:
                    flat[f"probe/{name}/{layer}/{metric}"] = float(values[metric])
    for metric, b in record["best"].get("model", {}).items():
        flat[f"probe/best/{metric}"] = float(b["value"])
        flat[f"probe/best_layer/{metric}"] = float(b["layer"])
    return flat


def read_probe(path: str | Path) -> dict:
    p = Path(path)
    p = p / "probe.json" if p.is_dir() else p
    if not p.is_file():
        raise PretrainError(f"no probe results at {p}")
    record = json.loads(p.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise PretrainError(f"{p}: format_version {record.get('format_version')} is not {FORMAT_VERSION}")
    return record


def chosen_layer(path: str | Path, metric: str) -> int:
    """The model's best single layer on ``metric`` in a ``probe.json``."""
    record = read_probe(path)
    best = record["best"].get("model", {}).get(metric)
    if best is None:
        ran = sorted(record["best"].get("model", {}))
        raise PretrainError(f"{path}: no '{metric}' result for the model to choose a layer by "
                            f"(it has: {', '.join(ran) or 'none'}; skipped: {record['skipped'] or 'none'})")
    return int(best["layer"])
