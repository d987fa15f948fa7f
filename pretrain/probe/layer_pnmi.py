"""Held-out PNMI of every layer of a model, next to MFCC, log-mel and the untrained twin: the
measurement behind the iteration gain (``experiments/iteration_gain.py``,
``experiments/gain_protocol.py``; docs/iteration_gain.md).

For each row and each k, k-means (FAISS, the pipeline's :func:`pretrain.cluster.kmeans.kmeans`)
is fitted on the frames of the same training utterances (a seeded choice of ``sample_frames``
50 Hz frames), the held-out frames are assigned, and the clustering is scored by PNMI against
the held-out phone alignments (``phones50``/``phones100`` label sets), overall and per voice.
Every layer is compared with MFCC on the *same* 50 Hz frames (MFCC's 100 Hz frame ``2i`` has
the centre of 50 Hz frame ``i``); MFCC on its own 100 Hz grid is scored too. Entry 0 of a
model, its front end's output, is the model's own input: a trained layer has to beat it for the
gain to be the Transformer's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import torch
from tqdm import tqdm

from pretrain.cluster.kmeans import assign, kmeans
from pretrain.cluster.quality import scores
from pretrain.data.labels import LabelSet
from pretrain.data.shards import read_manifest
from pretrain.features.extract import shard_utterances
from pretrain.features.mfcc import mfcc_39
from pretrain.model.states import LayerStates
from pretrain.probe.features import logmel_row


def utterances(shards: Path, limit_frames: int | None = None, seed: int = 0) -> Iterator[tuple[str, str, np.ndarray]]:
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


def voice_of(key: str) -> str:
    """The synthetic corpus's shard keys are ``<voice>/<voice>_<index>``."""
    return key.rsplit("/", 1)[-1].rsplit("_", 1)[0]


def logmel_50hz(wave: np.ndarray) -> np.ndarray:
    """80-bin Kaldi log-mel on the models' 50 Hz grid (the probes' log-mel baseline)."""
    return logmel_row([wave]).layers[0]


class LayerPnmi:
    """Held-out PNMI of MFCC, log-mel and every layer of a model, each clustered at every k,
    overall and per voice; the baselines are scored once, when it is made."""

    def __init__(self, shards: Path, heldout: Path, ks: list[int], sample_frames: int, seed: int, threads: int):
        # Explicit: OpenMP threads beyond the free cores spin against each other (and against
        # a training run next to this).
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

    def layers(self, checkpoint: Path | None = None, states: LayerStates | None = None,
               per_voice: dict | None = None) -> dict:
        """{"layer<i>": {k: PNMI}} of a model file or checkpoint folder (or of ``states``), with
        the front end's output as ``input_<frontend>``; per-voice PNMI goes into ``per_voice``
        when given."""
        # One utterance per forward (batch_samples 0): no front end sees padding.
        states = states or LayerStates(checkpoint, batch_samples=0)
        wanted = list(range(0, states.num_layers + 1))
        train_states = states(self.train_utts, wanted, progress=True, desc="hidden states")
        held_states = states(self.held_utts, wanted, progress=True, desc="hidden states")
        table: dict = {}
        desc = f"k-means of {checkpoint.name if checkpoint else 'the model'}"
        for layer in tqdm(wanted, desc=desc, unit="layer"):
            name = f"layer{layer}" if layer else f"input_{states.model.cfg.frontend}"
            scored = self.score(np.concatenate(train_states[layer]), held_states[layer])
            table[name] = {k: v for k, (v, _) in scored.items()}
            if per_voice is not None:
                per_voice[name] = {k: pv for k, (_, pv) in scored.items()}
        return table

    def untrained(self, checkpoint: Path, seed: int = 0) -> dict:
        """The same table for the model's untrained twin (same architecture, random weights)."""
        twin = LayerStates(checkpoint, batch_samples=0).untrained(seed)
        table = self.layers(states=twin)
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
