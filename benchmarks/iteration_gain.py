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

    python benchmarks/iteration_gain.py                      # the recipe, ~15 min on 2 cores
    python benchmarks/iteration_gain.py --set optim.max_steps=500 --name short
    python benchmarks/iteration_gain.py --eval-only OUT/runs/NAME   # score a trained run again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.cluster.kmeans import assign, kmeans  # noqa: E402
from pretrain.cluster.quality import scores  # noqa: E402
from pretrain.data.labels import LabelSet  # noqa: E402
from pretrain.data.shards import read_manifest  # noqa: E402
from pretrain.features.extract import shard_utterances  # noqa: E402
from pretrain.features.mfcc import mfcc_39  # noqa: E402
from pretrain.utils import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402

BIN = Path(sys.executable).parent


def run(cmd: list[str], log: Path) -> float:
    """Run a command, appending its output to ``log``; seconds it took. Fails loudly."""
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        sys.exit(f"command failed (exit {rc}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start


def prepare_data(out: Path, hours: float, heldout_hours: float, seed: int, log: Path,
                 voices: list[str] | None = None, max_clauses: int = 3, stretch: float = 1.0) -> tuple[Path, Path]:
    """Training shards with MFCC k=100 labels, and held-out shards with phone alignments:
    other sentences (seed + 1000), every voice (so voices left out of ``voices`` are unseen in
    training), the same sentence length and speaking rate."""
    data = out / "data"
    cfg = data / "iterate.yaml"
    data.mkdir(parents=True, exist_ok=True)
    corpus = {"synth_hours": hours, "synth_seed": seed, "per_shard": 32, "synth_max_clauses": max_clauses,
              "synth_stretch": stretch}
    if voices is not None:
        corpus["synth_voices"] = voices
    atomic_write_text(cfg, json.dumps({
        "run_dir": str(data), "corpus": corpus,
        "iterations": [{"features": "mfcc", "k": 100, "fraction": 0.5, "max_frames": 400_000, "max_steps": 1}],
        "train_configs": [], "train_overrides": ["optim.warmup_steps=0"], "export": False, "jobs": 2}))
    for stage in ("corpus", "shards", "it1.features", "it1.kmeans", "it1.labels", "it1.quality"):
        run([str(BIN / "pretrain"), "iterate", "--config", str(cfg), f"only={stage}"], log)
    held = out / "heldout"
    if not (held / "shards" / "manifest.json").is_file():
        run([str(BIN / "pretrain"), "corpus", "synth", "--out", str(held / "corpus"), "--hours", str(heldout_hours),
             "--seed", str(seed + 1000), f"max_clauses={max_clauses}", f"stretch={stretch}", "--jobs", "2"], log)
        run([str(BIN / "pretrain"), "shards", "build", "--input", str(held / "corpus"), "--out",
             str(held / "shards"), "--per-shard", "32", "--jobs", "2"], log)
    return data / "shards", held / "shards"


def train(out: Path, name: str, config: Path, overrides: list[str], shards: Path, nproc: int, log: Path) -> Path:
    run_dir = out / "runs" / name
    if (run_dir / "train_seconds.json").is_file():
        return run_dir
    cmd = [str(BIN / "launch"), "local", "--nproc", str(nproc), "pretrain", "train", "--config", str(config),
           f"run_dir={run_dir}", f"data.shards={shards}", "data.labels=[it1_km100]", *overrides]
    seconds = run(cmd, log)
    atomic_write_json(run_dir / "train_seconds.json", {"seconds": seconds, "command": cmd})
    return run_dir


def utterances(shards: Path, limit_frames: int | None = None, seed: int = 0):
    """(shard, key, waveform), shards in a seeded order, until ``limit_frames`` 50 Hz frames."""
    names = [s["name"] for s in read_manifest(shards)["shards"]]
    if limit_frames is not None:
        names = list(np.random.default_rng(seed).permutation(names))
    frames = 0
    for name in names:
        for key, wave in shard_utterances(shards / name):
            yield name, key, wave
            frames += len(wave) // 320
            if limit_frames is not None and frames >= limit_frames:
                return


def phone_labels(shards: Path, rate: int) -> dict[tuple[str, str], np.ndarray]:
    labels = LabelSet(shards, f"phones{rate}")
    return {(name, key): y for name in (s["name"] for s in read_manifest(shards)["shards"])
            for key, y in labels.load_shard(name).items()}


def pnmi(clusters: list[np.ndarray], phones: list[np.ndarray], k: int, num_phones: int) -> float:
    counts = np.zeros((num_phones, k), dtype=np.int64)
    for z, y in zip(clusters, phones):
        n = min(len(z), len(y))
        np.add.at(counts, (y[:n], z[:n]), 1)
    return scores(counts)["pnmi"]


def layer_states(model, waves: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Per utterance, the front end's output (the model's input, entry 0) and every layer's
    (frames, dim) hidden states; one utterance per forward, so no front end sees padding."""
    import torch

    out = []
    with torch.no_grad():
        for w in tqdm(waves, desc="hidden states", unit="utt", leave=False):
            audio, lengths = torch.from_numpy(w)[None], torch.tensor([len(w)])
            states, _ = model.backbone.all_hidden_states(audio, lengths, front_end=True)
            out.append([t[0].float().numpy() for t in states])
    return out


def voice_of(key: str) -> str:
    """The synthetic corpus's shard keys are ``<voice>/<voice>_<index>``."""
    return key.rsplit("/", 1)[-1].rsplit("_", 1)[0]


def logmel_50hz(wave: np.ndarray) -> np.ndarray:
    """80-bin Kaldi log-mel on the models' 50 Hz grid (the probes' log-mel baseline)."""
    from pretrain.probe.features import logmel_row

    return logmel_row([wave]).layers[0]


class Evaluator:
    """Held-out PNMI of MFCC, log-mel and every layer of a model, each clustered at every k,
    overall and per voice.

    The k-means samples are the frames of the same training utterances (a seeded choice of
    ``sample_frames`` 50 Hz frames) for every row; the baselines are scored once."""

    def __init__(self, shards: Path, heldout: Path, ks: list[int], sample_frames: int, seed: int, threads: int):
        import faiss
        import torch

        # Explicit: OpenMP threads beyond the free cores spin against each other (and against
        # a training run next to this) and made the evaluation several times slower.
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self.ks, self.seed = ks, seed
        self.train_utts = [w for _, _, w in utterances(shards, sample_frames, seed)]
        held = list(utterances(heldout))
        self.held_utts = [w for _, _, w in held]
        self.by_voice: dict[str, list[int]] = {}
        for i, (_, key, _) in enumerate(held):
            self.by_voice.setdefault(voice_of(key), []).append(i)
        self.per_voice: dict = {}
        p50, p100 = phone_labels(heldout, 50), phone_labels(heldout, 100)
        self.num_phones = LabelSet(heldout, "phones50").num_classes
        self.y50 = [p50[(s, k)] for s, k, _ in held]
        self.y100 = [p100[(s, k)] for s, k, _ in held]
        self.train_frames = int(sum(len(w) // 320 for w in self.train_utts))
        self.heldout_frames = int(sum(len(y) for y in self.y50))

        mfcc_train = np.concatenate([mfcc_39(w) for w in self.train_utts])
        mfcc_held = [mfcc_39(w) for w in self.held_utts]
        self.baselines: dict = {"mfcc_50hz": {}, "mfcc_100hz": {}}
        self.per_voice["mfcc_50hz"] = {}
        for k in ks:
            centroids, _ = kmeans(mfcc_train, k, seed=seed)
            z = [assign(x, centroids)[0] for x in mfcc_held]
            self.baselines["mfcc_100hz"][k] = pnmi(z, self.y100, k, self.num_phones)
            # MFCC frame 2i has the centre of 50 Hz frame i: the layers' frames exactly.
            z50 = [zz[::2] for zz in z]
            self.baselines["mfcc_50hz"][k] = pnmi(z50, self.y50, k, self.num_phones)
            self.per_voice["mfcc_50hz"][k] = self._voices(z50, k)
        logmel = self.score(np.concatenate([logmel_50hz(w) for w in self.train_utts]),
                            [logmel_50hz(w) for w in self.held_utts])
        self.baselines["logmel_50hz"] = {k: v for k, (v, _) in logmel.items()}
        self.per_voice["logmel_50hz"] = {k: pv for k, (_, pv) in logmel.items()}

    def _voices(self, z: list[np.ndarray], k: int) -> dict[str, float]:
        return {v: pnmi([z[i] for i in idx], [self.y50[i] for i in idx], k, self.num_phones)
                for v, idx in sorted(self.by_voice.items())}

    def score(self, x_train: np.ndarray, held: list[np.ndarray]) -> dict[int, tuple[float, dict]]:
        """{k: (held-out PNMI, per-voice PNMI)} of k-means fitted on ``x_train``."""
        out = {}
        for k in self.ks:
            centroids, _ = kmeans(x_train, k, seed=self.seed)
            z = [assign(u, centroids)[0] for u in held]
            out[k] = (pnmi(z, self.y50, k, self.num_phones), self._voices(z, k))
        return out

    def layers(self, checkpoint: Path | None = None, model=None, per_voice: dict | None = None) -> dict:
        """{"layer<i>": {k: PNMI}} of a model file or checkpoint folder (or of ``model``);
        per-voice PNMI goes into ``per_voice`` when given."""
        from pretrain.model.checkpoint import load_model

        if model is None:
            model = load_model(checkpoint)
        model = model.eval()
        train_states = layer_states(model, self.train_utts)
        held_states = layer_states(model, self.held_utts)
        table: dict = {}
        # Entry 0, the front end's output, is the model's own input: a trained layer has to do
        # better than it for the gain to be the Transformer's.
        desc = f"k-means of {checkpoint.name if checkpoint else 'the model'}"
        for layer in tqdm(range(0, model.cfg.encoder_layers + 1), desc=desc, unit="layer"):
            name = f"layer{layer}" if layer else f"input_{model.cfg.frontend}"
            scored = self.score(np.concatenate([u[layer] for u in train_states]), [u[layer] for u in held_states])
            table[name] = {k: v for k, (v, _) in scored.items()}
            if per_voice is not None:
                per_voice[name] = {k: pv for k, (_, pv) in scored.items()}
        return table

    def untrained(self, checkpoint: Path, seed: int = 0) -> dict:
        """The same table for the model's untrained twin (same architecture, random weights)."""
        import torch

        from pretrain.model.checkpoint import load_model
        from pretrain.model.hubert import HubertPretrain

        trained = load_model(checkpoint)
        torch.manual_seed(seed)
        table = self.layers(model=HubertPretrain(trained.cfg, trained.labels))
        return {name: row for name, row in table.items() if name.startswith("layer")}

    def verdict(self, table: dict) -> dict:
        """Per k: MFCC's PNMI (the larger of its two grids), the best layer and the gain."""
        out = {}
        layers = [name for name in table if name.startswith("layer")]
        for k in self.ks:
            mfcc = max(self.baselines["mfcc_50hz"][k], self.baselines["mfcc_100hz"][k])
            best = max(layers, key=lambda name: table[name][k])
            out[k] = {"pnmi_mfcc": mfcc, "pnmi_best_layer": table[best][k], "best_layer": int(best[5:]),
                      "gain": table[best][k] - mfcc}
        return out


def training_summary(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    last = train_rows[-1] if train_rows else {}
    acc = {k: v for k, v in last.items() if k.startswith("acc_masked")}
    seconds = json.loads((run_dir / "train_seconds.json").read_text())["seconds"] \
        if (run_dir / "train_seconds.json").is_file() else None
    speeds = [r["audio_s_per_s"] for r in train_rows if r.get("audio_s_per_s")]
    speed = float(np.median(speeds)) if speeds else None
    # Minutes of training steps up to each logged step (rows hold the mean step time since the
    # previous row); the run's wall time adds start-up and checkpoint saves to this.
    minutes, prev, total = {}, 0, 0.0
    for r in train_rows:
        total += r["step_time_s"] * (r["step"] - prev)
        prev = r["step"]
        minutes[r["step"]] = total / 60
    return {"steps": last.get("step"), "train_seconds": seconds, "last_loss": last.get("loss"), **acc,
            "audio_s_per_s": speed,
            # from the median logged throughput: the metrics hold rates, not totals
            "audio_hours_seen": speed * seconds / 3600 if speed and seconds else None,
            "step_minutes": minutes,
            "acc_masked_at": {r["step"]: r.get("acc_masked") for r in train_rows}}


def plot_curve(curve: list[dict], mfcc: dict, ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def finish_minutes_plot(fig, axes, ks: list[int], ylabel: str, path: Path) -> None:
    """Axes of training minutes, one panel per k; legend on the first; saved atomically."""
    for ax, k in zip(axes[0], ks):
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"k = {k}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def training_arguments(doc: str, name_help: str, out: str) -> argparse.ArgumentParser:
    """The options both gain benchmarks share: the training config and the corpus size."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "small_cpu.yaml"), help="training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training override")
    ap.add_argument("--name", default="small_cpu", help=name_help)
    ap.add_argument("--out", default=out, help="work folder (data is reused across runs)")
    ap.add_argument("--hours", type=float, default=1.5, help="training corpus hours")
    return ap


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
    evaluator = Evaluator(shards, heldout, ks, args.sample_frames, args.seed, args.threads)
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
