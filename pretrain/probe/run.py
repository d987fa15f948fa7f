"""``pretrain probe``: every probe on every probed layer, next to the baselines.

Flow: the evaluation set (``data.load_eval_set``: audio, speakers, 50 Hz phones, splits) ->
rows of frozen features (``features``: the model's layers from one forward, the untrained twin,
MFCC, log-mel) -> per row and layer: ABX (``abx``), frame phone accuracy and CTC PER, speaker
accuracy (``linear``), PNMI of a k-means of the layer -> ``probe.json``, ``probe.md``,
``probe.png`` in ``out``. A probe whose reference is missing is skipped with its reason (in
the JSON, the table and the log); nothing else fails.

The weighted-sum row (``weighted``) combines the probed layers with SUPERB's learned softmax
weights: each linear probe learns its own; ABX and PNMI use the frame phone probe's.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numba
import numpy as np
import torch
from tqdm import tqdm

from pretrain.cluster.kmeans import assign, kmeans
from pretrain.cluster.quality import scores
from pretrain.config import write_run_record
from pretrain.config.probe import BASELINES, PROBES, ProbeConfig, parse_layers, parse_list
from pretrain.model.states import LayerStates
from pretrain.probe import linear
from pretrain.probe.abx import abx_errors, build_items, read_item_file
from pretrain.probe.knnvc import KnnvcProbe
from pretrain.probe.data import load_eval_set
from pretrain.probe.features import Row, logmel_row, mfcc_row, model_encoder, model_layers, offsets_of
from pretrain.probe.results import FORMAT_VERSION, best_layers, markdown, plot
from pretrain.utils import PretrainError, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

def _threads(n: int) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


class Prober:
    """Runs the chosen probes on one representation (or a weighted sum of several)."""

    def __init__(self, cfg: ProbeConfig, es, probes: list[str]):
        self.cfg, self.es, self.probes = cfg, es, probes
        utts = es.utterances
        self.offsets = offsets_of([u.audio for u in utts])
        self.utt_split = [u.split for u in utts]
        codes = {"train": 0, "dev": 1, "test": 2}
        self.frame_split = np.repeat([codes[s] for s in self.utt_split], np.diff(self.offsets))
        self.phones = np.concatenate([u.phones for u in utts]) if es.reference else None
        self.items = None
        self.item_stats = None
        self.seconds: dict[str, float] = {}
        if "abx" in probes and cfg.abx.item_file is not None:
            self.items, self.item_stats = read_item_file(cfg.abx.item_file, [u.key for u in utts], self.offsets,
                                                         cfg.abx.max_per_group, cfg.abx.seed)
        elif "abx" in probes:
            speakers = {s: i for i, s in enumerate(es.speakers)}
            self.items = build_items([u.phones for u in utts], self.offsets, [speakers[u.speaker] for u in utts],
                                     es.silence, cfg.abx.max_per_group, cfg.abx.seed)

        self.knnvc = None
        if "knnvc" in probes:
            kc = cfg.knnvc
            self.knnvc = KnnvcProbe(es, self.offsets, kc.k, kc.window, kc.max_pairs, kc.seed, kc.audio, kc.device)

    def _timed(self, name, fn, *args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return out

    def layer(self, layers: list[np.ndarray], encode=None) -> dict:
        """Every probe on one representation (``layers`` of one entry) or on the weighted sum of
        several (the frame probe's weights then define the sum ABX and PNMI see; kNN-VC runs on
        single representations only). ``encode`` turns new audio into this representation."""
        cfg, es, out = self.cfg, self.es, {}
        combined = layers[0]
        phone_predict = speaker_predict = None
        if "phone" in self.probes:
            pc = cfg.phone
            res = self._timed("phone", linear.frame_probe, layers, self.phones, self.frame_split, es.num_phones,
                              pc.lrs, pc.epochs, pc.batch, pc.seed)
            head = res.pop("_head")
            phone_predict = res.pop("_predict")
            out.update(res)
            # CTC starts from the frame classifier probe-dev chose, at its learning rate.
            out.update(self._timed("ctc", linear.ctc_probe, layers, self.offsets,
                                   [u.phones for u in es.utterances], self.utt_split, es.num_phones, es.silence,
                                   [res["phone_lr"]], pc.ctc_epochs, pc.batch, pc.seed, init=head))
            if len(layers) > 1:
                w = head.layer_weights()
                train_rows = self.frame_split == 0
                combined = sum(wi * linear.Standardizer.fit(x[train_rows])(x) for wi, x in zip(w, layers))
        elif len(layers) > 1:
            raise PretrainError("the weighted sum needs the phone probe (its weights come from it)")
        if "speaker" in self.probes:
            sc = cfg.speaker
            res = self._timed("speaker", linear.speaker_probe, layers, self.offsets,
                              [u.speaker for u in es.utterances], self.utt_split, sc.lrs, sc.epochs, sc.seed)
            speaker_predict = res.pop("_predict")
            out.update(res)
        if "abx" in self.probes:
            out.update(self._timed("abx", abx_errors, combined, self.items, cfg.abx.min_triplets))
        if "pnmi" in self.probes:
            out.update(self._timed("pnmi", self._pnmi, combined))
        if self.knnvc is not None and len(layers) == 1:
            out.update(self._timed("knnvc", self.knnvc, layers[0], phone_predict, speaker_predict, encode))
        return out

    def _pnmi(self, x: np.ndarray) -> dict:
        train, test = self.frame_split == 0, self.frame_split == 2
        k = self.cfg.pnmi_k
        centroids, _ = kmeans(np.ascontiguousarray(x[train], dtype=np.float32), k, seed=self.cfg.split_seed)
        z, _ = assign(np.ascontiguousarray(x[test], dtype=np.float32), centroids)
        counts = np.zeros((self.es.num_phones, k), dtype=np.int64)
        np.add.at(counts, (self.phones[test], z), 1)
        s = scores(counts)
        return {"pnmi": s["pnmi"], "pnmi_k": k, "pnmi_frames": s["frames"]}


def probe(cfg: ProbeConfig, progress: bool = True, argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    threads = _threads(cfg.threads)
    out = Path(cfg.out)
    probes = parse_list(cfg.probes, PROBES, "probes")
    if "knnvc" in probes:  # its content and speaker figures are those probes' decisions
        probes += [p for p in ("phone", "speaker") if p not in probes]
    baselines = parse_list(cfg.baselines, BASELINES, "baselines")
    wanted_layers = parse_layers(cfg.layers)

    source = None
    if cfg.checkpoint is not None:
        source = LayerStates(cfg.checkpoint, cfg.device, cfg.checkpoint_sha256, cfg.batch_samples)
        if wanted_layers and wanted_layers[-1] > source.num_layers:
            raise PretrainError(f"layer {wanted_layers[-1]} is out of range: {cfg.checkpoint} has "
                                f"{source.num_layers} Transformer layers (layers are 1-based)")
    layers = wanted_layers or (list(range(1, source.num_layers + 1)) if source else [])

    t = time.perf_counter()
    es = load_eval_set(cfg.eval_shards, cfg.reference, cfg.split_seed, cfg.train_fraction, cfg.dev_fraction,
                       cfg.max_utterances)
    load_seconds = time.perf_counter() - t
    # Written once the model and the evaluation set have loaded: a bad input leaves no trace.
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, cfg, argv)
    if cfg.abx.item_file is not None:
        es.skipped.pop("abx", None)  # the item file brings the phones and speakers ABX needs
    if "knnvc" in probes and "speaker" in es.skipped:
        es.skipped["knnvc"] = f"converts between speakers: {es.skipped['speaker']}"
    skipped = {p: es.skipped[p] for p in probes if p in es.skipped}
    if "abx" in probes and "abx" not in skipped and len(es.speakers) < 2:
        log.warning("ABX across speakers needs two speakers; %s has one", cfg.eval_shards)
    for p, reason in skipped.items():
        log.warning("probe %s skipped: %s", p, reason)
    run_probes = [p for p in probes if p not in skipped]
    prober = Prober(cfg, es, run_probes)
    if prober.knnvc is not None and not prober.knnvc.pairs:
        skipped["knnvc"] = ("no speaker has a probe-test utterance while another has probe-train/dev ones "
                            "(kNN-VC converts the first to the second)")
        log.warning("probe knnvc skipped: %s", skipped["knnvc"])
        run_probes.remove("knnvc")  # the prober's own list
        prober.knnvc = None

    waves = [u.audio for u in es.utterances]
    rows: list[Row] = []
    t = time.perf_counter()
    if "mfcc" in baselines:
        rows.append(mfcc_row(waves))
    if "logmel" in baselines:
        rows.append(logmel_row(waves))
    if source is not None:
        rows.append(Row("model", "model", model_layers(source, waves, layers, progress, "model forward"),
                        source.describe(), model_encoder(source)))
        if "untrained" in baselines:
            twin = source.untrained(cfg.untrained_seed)
            rows.append(Row("untrained", "baseline",
                            model_layers(twin, waves, layers, progress, "untrained forward"),
                            f"the same architecture at random initialization (seed {cfg.untrained_seed})",
                            model_encoder(twin)))
    feature_seconds = time.perf_counter() - t

    # The probes' matrices are small: a second torch thread only adds synchronization, and on a
    # machine that is also training it competes for the cores; numba's DTW and FAISS keep
    # every thread.
    torch.set_num_threads(1)

    results: dict = {}
    todo = [(row, layer) for row in rows for layer in row.layers]
    weighted = cfg.weighted_sum and "phone" in run_probes
    todo += [(row, "weighted") for row in rows if weighted and len(row.layers) > 1]
    with tqdm(total=len(todo), desc="probes", unit="layer", disable=not progress) as bar:
        for row, layer in todo:
            entry = results.setdefault(row.name, {"kind": row.kind, "description": row.description, "layers": {}})
            reps = list(row.layers.values()) if layer == "weighted" else [row.layers[layer]]
            encode = None if layer == "weighted" or row.encode is None else (
                lambda w, row=row, layer=layer: row.encode(w, layer))
            entry["layers"][str(layer)] = prober.layer(reps, encode) if run_probes else {}
            bar.set_postfix_str(f"{row.name} {layer}")
            bar.update()

    record = {
        "format_version": FORMAT_VERSION,
        "checkpoint": None if cfg.checkpoint is None else str(Path(cfg.checkpoint).resolve()),
        "checkpoint_sha256": source.sha256 if source else None,
        "model": source.describe() if source else None,
        "step": cfg.step,
        "eval": es.describe(),
        "probes": probes,
        "skipped": skipped,
        "settings": {"split_seed": cfg.split_seed, "train_fraction": cfg.train_fraction,
                     "dev_fraction": cfg.dev_fraction, "abx": {**vars(cfg.abx), "items": prober.item_stats},
                     "phone": vars(cfg.phone),
                     "speaker": vars(cfg.speaker), "knnvc": vars(cfg.knnvc), "pnmi_k": cfg.pnmi_k, "untrained_seed": cfg.untrained_seed,
                     "threads": threads},
        "rows": results,
        "best": best_layers(results),
        "seconds": {"total": round(time.perf_counter() - started, 2), "load": round(load_seconds, 2),
                    "features": round(feature_seconds, 2),
                    **{k: round(v, 2) for k, v in prober.seconds.items()}},
    }
    atomic_write_text(out / "probe.md", markdown(record))
    plot(record, out / "probe.png")
    atomic_write_json(out / "probe.json", record)  # last: its presence marks a finished probe run
    return record
