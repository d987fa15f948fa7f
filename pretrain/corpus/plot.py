"""``overview.png`` of a synthetic corpus: what a person checks first, at a glance.

Top: one utterance per engine as a spectrogram with its phone segments drawn on it, so a
misaligned voice is obvious. Bottom: hours and utterance durations per voice.
"""

from __future__ import annotations

import json
from pathlib import Path

import soundfile as sf


def plot_overview(corpus: Path, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: r["duration"]):  # the shortest stays readable
        examples.setdefault(rec["engine"], rec)
    rows = len(examples) + 1
    fig, axes = plt.subplots(rows, 1, figsize=(14, 2.6 * rows), squeeze=False)
    for ax, rec in zip(axes[:, 0], examples.values()):
        audio, sr = sf.read(corpus / rec["audio"], dtype="float32")
        align = json.loads((corpus / rec["align"]).read_text())
        ax.specgram(audio, NFFT=400, Fs=sr, noverlap=240, cmap="magma", scale="dB", vmin=-130)
        for phone, start, end in align["segments"]:
            ax.axvline(start / sr, color="cyan", linewidth=0.6)
            ax.text((start + end) / 2 / sr, sr * 0.45, phone, color="white", fontsize=7,
                    ha="center", va="top")
        ax.set_xlim(0, len(audio) / sr)
        ax.set_ylim(0, sr / 2)
        ax.set_ylabel("Hz")
        ax.set_title(f"{rec['utt_id']} ({rec['engine']}): {rec['text']}", fontsize=8, loc="left")
    ax = axes[-1, 0]
    voices = sorted({r["voice"] for r in records})
    durations = [[r["duration"] for r in records if r["voice"] == v] for v in voices]
    ax.boxplot(durations, showfliers=False)
    ax.set_xticks(range(1, len(voices) + 1), voices, fontsize=8)
    ax.set_ylabel("utterance seconds")
    total_h = sum(sum(d) for d in durations) / 3600
    ax.set_title(f"{len(records)} utterances, {total_h:.2f} h; minutes per voice:\n"
                 + ", ".join(f"{v} {sum(d) / 60:.1f}" for v, d in zip(voices, durations)),
                 fontsize=8, loc="left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
