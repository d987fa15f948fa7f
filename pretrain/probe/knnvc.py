"""kNN voice conversion (Baas, van Niekerk and Kamper, 2023) on any representation, and what it
says about the representation.

Every frame of a source utterance is replaced by the mean of its ``k`` nearest frames (cosine)
among a target speaker's reference frames, in one layer. FAISS does the matching: an exact
inner-product index over unit rows, all source frames in one batched search (on a GPU when one
is there).

**Audio without a vocoder.** A feature frame ``i`` stands for the 20 ms hop of waveform around
its centre, sample ``320 i + 200`` (the conv front end's 400-sample receptive field, stride
320). Output frame ``j`` becomes the mean of the ``k`` matched frames' waveform segments of
``window`` samples around their centres, Hann-windowed, overlap-added at ``320 j + 200`` and
divided by the summed windows, so any window length keeps unit gain (640 = 50 % overlap).

**What it measures** (``KnnvcProbe``, ``pretrain probe --probes knnvc``): over ordered speaker
pairs of the evaluation set, sources from the source speaker's probe-test utterances, the
reference from the target speaker's probe-train and probe-dev ones:

- *content*: the share of matched frames whose phone is the source frame's phone, and the
  frame phone probe (trained on this representation's probe-train frames) on the converted
  features against the source's phones;
- *speaker*: the speaker probe's decision on the converted utterances' mean features, and on
  the converted audio encoded again by the same representation: the share given to the target,
  and to the source (leakage);
- *smoothness*: how often consecutive output frames' nearest matches are consecutive frames
  of one reference utterance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from pretrain.cluster.kmeans import faiss_gpus
from pretrain.probe.abx import unit_rows

PAPER_LAYER = "6"
"""The paper's WavLM layer, ``pretrain knnvc``'s default."""
HOP = 320
CENTRE = 200
"""Frame ``i`` of the 50 Hz grid is centred on sample ``320 i + 200``."""


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 for FAISS."""
    return unit_rows(x).astype(np.float32)


def knn(query: np.ndarray, reference: np.ndarray, k: int, device: str = "auto") -> np.ndarray:
    """Indices (queries, k) of each query row's ``k`` nearest reference rows by cosine, nearest
    first (FAISS exact search; GPU under ``auto`` when FAISS sees one, or ``cuda``)."""
    import faiss

    if len(reference) < k:
        raise ValueError(f"the reference has {len(reference)} frames; k = {k} needs at least as many")
    index = faiss.IndexFlatIP(reference.shape[1])
    if device == "cuda" or (device == "auto" and faiss_gpus() > 0):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(unit(reference))
    _, idx = index.search(unit(query), k)
    return idx.astype(np.int64)


@dataclass
class Reference:
    """A target speaker's reference set: frames of several utterances, concatenated."""

    feats: np.ndarray
    wave: np.ndarray
    """The utterances' waveforms, concatenated."""
    centre: np.ndarray
    """Sample of ``wave`` at each frame's centre."""
    next_frame: np.ndarray
    """Index of the following frame of the same utterance; -1 at an utterance's end."""
    phones: Optional[np.ndarray] = None

    @classmethod
    def build(cls, feats: list[np.ndarray], waves: list[np.ndarray],
              phones: Optional[list[np.ndarray]] = None) -> "Reference":
        centres, nexts, start_sample, start_frame = [], [], 0, 0
        for f, w in zip(feats, waves):
            n = len(f)
            centres.append(start_sample + CENTRE + HOP * np.arange(n))
            nxt = start_frame + np.arange(1, n + 1)
            nxt[-1:] = -1
            nexts.append(nxt)
            start_sample += len(w)
            start_frame += n
        return cls(np.concatenate(feats).astype(np.float32), np.concatenate(waves).astype(np.float32),
                   np.concatenate(centres).astype(np.int64), np.concatenate(nexts).astype(np.int64),
                   None if phones is None else np.concatenate(phones))

    @property
    def seconds(self) -> float:
        return len(self.wave) / 16000


def overlap_add(ref: Reference, idx: np.ndarray, num_samples: int, window: int = 640) -> np.ndarray:
    """The converted waveform (``num_samples`` long) of matches ``idx`` (frames, k)."""
    half = window // 2
    hann = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)).astype(np.float32)
    padded = np.concatenate([np.zeros(half, np.float32), ref.wave, np.zeros(window, np.float32)])
    # Segment of window samples around each matched frame's centre, averaged over the k matches.
    starts = ref.centre[idx]  # (frames, k): in padded coordinates the segment starts here
    segments = padded[starts[..., None] + np.arange(window)].mean(1) * hann  # (frames, window)
    out = np.zeros(num_samples + 2 * window, np.float32)
    norm = np.zeros_like(out)
    where = (CENTRE + HOP * np.arange(len(idx)))[:, None] + np.arange(window)  # output, shifted by half
    np.add.at(out, where, segments)
    np.add.at(norm, where, np.broadcast_to(hann, segments.shape))
    out, norm = out[half:half + num_samples], norm[half:half + num_samples]
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 1e-3)


def smoothness(idx: np.ndarray, ref: Reference) -> float:
    """Share of consecutive output frames whose nearest matches are consecutive reference frames."""
    if len(idx) < 2:
        return float("nan")
    return float(np.mean(ref.next_frame[idx[:-1, 0]] == idx[1:, 0]))


@dataclass
class Conversion:
    idx: np.ndarray
    feats: np.ndarray
    """The converted features: the mean of the k matches."""
    seconds: float
    """Matching and averaging (not the audio)."""


def convert(query: np.ndarray, ref: Reference, k: int, device: str = "auto") -> Conversion:
    t = time.perf_counter()
    idx = knn(query, ref.feats, k, device)
    feats = ref.feats[idx].mean(1)
    return Conversion(idx, feats, time.perf_counter() - t)


Encode = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Waveforms -> the representation's frames (50 Hz grid), one array per waveform."""


class KnnvcProbe:
    """kNN-VC over ordered speaker pairs of an evaluation set, for one representation at a time
    (``pretrain.probe.run.Prober`` calls it per row and layer)."""

    def __init__(self, es, offsets: np.ndarray, k: int, window: int, max_pairs: int, seed: int, audio: bool,
                 device: str = "auto"):
        self.es, self.offsets, self.k, self.window, self.audio, self.device = es, offsets, k, window, audio, device
        speakers = es.speakers
        by = {s: [i for i, u in enumerate(es.utterances) if u.speaker == s] for s in speakers}
        pairs = [(s, t) for s in speakers for t in speakers if s != t
                 and any(es.utterances[i].split == "test" for i in by[s])
                 and any(es.utterances[i].split != "test" for i in by[t])]
        rng = np.random.default_rng(seed)
        if len(pairs) > max_pairs:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
        self.pairs = pairs
        self.sources = {s: [i for i in by[s] if es.utterances[i].split == "test"] for s, _ in pairs}
        self.references = {t: [i for i in by[t] if es.utterances[i].split != "test"] for _, t in pairs}

    def _utt(self, x: np.ndarray, i: int) -> np.ndarray:
        return x[self.offsets[i]:self.offsets[i + 1]]

    def __call__(self, x: np.ndarray, phone_predict: Optional[Callable] = None,
                 speaker_predict: Optional[Callable] = None, encode: Optional[Encode] = None) -> dict:
        """Metrics of one representation ``x`` (frames, dim), averaged over the pairs.
        ``phone_predict`` maps frames to phone ids, ``speaker_predict`` utterance mean features
        to speaker names (the representation's own probes); ``encode`` re-encodes audio."""
        utts, has_phones = self.es.utterances, self.es.reference is not None
        per_pair: dict[str, list[float]] = {}
        seconds = source_seconds = 0.0

        def add(name, value):
            per_pair.setdefault(name, []).append(value)

        for s, t in self.pairs:
            ref_ix = self.references[t]
            ref = Reference.build([self._utt(x, i) for i in ref_ix], [utts[i].audio for i in ref_ix],
                                  [utts[i].phones for i in ref_ix] if has_phones else None)
            matched = same = 0
            phone_hits = frames = 0
            converted_means, waves = [], []
            smooth = []
            for i in self.sources[s]:
                conv = convert(self._utt(x, i), ref, self.k, self.device)
                seconds += conv.seconds
                source_seconds += len(utts[i].audio) / 16000
                smooth.append(smoothness(conv.idx, ref))
                if has_phones:
                    same += int((ref.phones[conv.idx] == utts[i].phones[:, None]).sum())
                    matched += conv.idx.size
                    if phone_predict is not None:
                        phone_hits += int((phone_predict(conv.feats) == utts[i].phones).sum())
                        frames += len(conv.feats)
                converted_means.append(conv.feats.mean(0))
                if self.audio and encode is not None:
                    t0 = time.perf_counter()
                    waves.append(overlap_add(ref, conv.idx, len(utts[i].audio), self.window))
                    seconds += time.perf_counter() - t0
            add("knnvc_smooth", 100 * float(np.nanmean(smooth)))
            if has_phones:
                add("knnvc_content", 100 * same / matched)
                if phone_predict is not None:
                    add("knnvc_phone_acc", 100 * phone_hits / frames)
            if speaker_predict is not None:
                said = np.asarray(speaker_predict(np.stack(converted_means)))
                add("knnvc_target", 100 * float(np.mean(said == t)))
                add("knnvc_source", 100 * float(np.mean(said == s)))
                if waves:
                    again = np.stack([f.mean(0) for f in encode(waves)])
                    said = np.asarray(speaker_predict(again))
                    add("knnvc_target_audio", 100 * float(np.mean(said == t)))
                    add("knnvc_source_audio", 100 * float(np.mean(said == s)))
        out = {name: float(np.mean(v)) for name, v in per_pair.items()}
        out.update(knnvc_pairs=len(self.pairs), knnvc_k=self.k,
                   knnvc_seconds_per_source_minute=60 * seconds / max(source_seconds, 1e-9))
        return out


# --------------------------------------------------------------------------- pretrain knnvc


def _spectrogram(ax, wave: np.ndarray, title: str) -> None:
    # 25 ms Hann frames every 10 ms, log power: enough to see formants and voicing carry over.
    n_fft, hop = 400, 160
    if len(wave) < n_fft:
        wave = np.pad(wave, (0, n_fft - len(wave)))
    frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    ax.imshow(10 * np.log10(power.T + 1e-10), origin="lower", aspect="auto", cmap="magma",
              extent=(0, len(wave) / 16000, 0, 8), vmin=-80, vmax=30)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("s", fontsize=7)
    ax.set_ylabel("kHz", fontsize=7)
    ax.tick_params(labelsize=6)


def run_knnvc(cfg, progress: bool = True, argv: list[str] | None = None) -> dict:
    """``pretrain knnvc``: convert source utterances to the target speaker; write the audio,
    the spectrograms and ``knnvc.json``."""
    import logging
    import os
    from pathlib import Path

    import torch

    from pretrain.config import write_run_record
    from pretrain.data.audio import encode as encode_audio
    from pretrain.model.states import LayerStates
    from pretrain.probe.data import load_eval_set
    from pretrain.probe.features import logmel_frames, mfcc_frames
    from pretrain.probe.results import chosen_layer
    from pretrain.utils import PretrainError, atomic_savefig, atomic_write_bytes, atomic_write_json

    log = logging.getLogger(__name__)
    started = time.perf_counter()
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = Path(cfg.out)

    layer, layer_note = None, None
    if cfg.features == "model":
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        states = LayerStates(cfg.checkpoint, device)
        layer = chosen_layer(cfg.layer_from, "phone_acc") if cfg.layer == "auto" else int(cfg.layer)
        if cfg.layer == PAPER_LAYER and layer > states.num_layers:
            # The default is the paper's WavLM layer; a smaller model gets its last layer, said so.
            layer_note = (f"layer {layer} (the paper's) is beyond {cfg.checkpoint}'s {states.num_layers} layers: "
                          f"matching in its last layer, {states.num_layers}")
            log.warning(layer_note)
            layer = states.num_layers
        if layer > states.num_layers:
            raise PretrainError(f"layer {layer} is out of range: {cfg.checkpoint} has {states.num_layers} "
                                "Transformer layers (layers are 1-based; set layer=...)")

        def frames(waves):
            # Minutes of reference speech take a while on a CPU: show it.
            return states(waves, [layer], progress, f"layer {layer} forward")[layer]
        what = f"{states.describe()}, layer {layer}"
    else:
        frames = mfcc_frames if cfg.features == "mfcc" else logmel_frames
        what = "MFCC-39" if cfg.features == "mfcc" else "80-bin log-mel"

    es = load_eval_set(cfg.shards)
    speakers = es.speakers
    for role, name in (("source", cfg.source), ("target", cfg.target)):
        if name not in speakers:
            raise PretrainError(f"{role} speaker '{name}' is not in {cfg.shards} (speakers: "
                                f"{', '.join(speakers[:20]) or 'none: no speaker metadata'})")
    by_key = {u.key: u for u in es.utterances}
    if cfg.source_keys:
        for key in cfg.source_keys:
            if key not in by_key:
                raise PretrainError(f"source key '{key}' is not in {cfg.shards}")
            if by_key[key].speaker != cfg.source:
                raise PretrainError(f"source key '{key}' is spoken by '{by_key[key].speaker}', not '{cfg.source}'")
        sources = [by_key[k] for k in cfg.source_keys]
    else:
        sources = [u for u in es.utterances if u.speaker == cfg.source][:cfg.max_sources]
    refs = [u for u in es.utterances if u.speaker == cfg.target]
    if cfg.max_reference_seconds is not None:
        kept, total = [], 0.0
        for u in refs:
            if kept and total + len(u.audio) / 16000 > cfg.max_reference_seconds:
                break
            kept.append(u)
            total += len(u.audio) / 16000
        refs = kept
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, cfg, argv)

    t = time.perf_counter()
    ref_feats = frames([u.audio for u in refs])
    src_feats = frames([u.audio for u in sources])
    encode_seconds = time.perf_counter() - t
    has_phones = es.reference is not None
    ref = Reference.build(ref_feats, [u.audio for u in refs], [u.phones for u in refs] if has_phones else None)
    if len(ref.feats) < cfg.k:
        raise PretrainError(f"the target's reference has {len(ref.feats)} frames; k = {cfg.k} needs more")
    target_mean = unit(ref.feats.mean(0, keepdims=True))[0]

    results, waves_out = [], []
    match_seconds = audio_seconds = 0.0
    for n, (u, q) in enumerate(zip(sources, src_feats)):
        conv = convert(q, ref, cfg.k, cfg.device)
        match_seconds += conv.seconds
        t = time.perf_counter()
        wave = overlap_add(ref, conv.idx, len(u.audio), cfg.window)
        audio_seconds += time.perf_counter() - t
        waves_out.append(wave)
        source_mean = unit(q.mean(0, keepdims=True))[0]
        conv_mean = unit(conv.feats.mean(0, keepdims=True))[0]
        entry = {"key": u.key, "seconds": round(len(u.audio) / 16000, 3), "frames": len(q),
                 "wav": f"converted_{n}.wav", "source_wav": f"source_{n}.wav",
                 "smoothness": 100 * smoothness(conv.idx, ref),
                 "cosine_to_target_mean": float(conv_mean @ target_mean),
                 "cosine_to_source_mean": float(conv_mean @ source_mean),
                 "source_cosine_to_target_mean": float(source_mean @ target_mean)}
        if has_phones:
            entry["content"] = 100 * float((ref.phones[conv.idx] == u.phones[:, None]).mean())
        results.append((entry, conv))
        atomic_write_bytes(out / f"converted_{n}.wav", encode_audio(np.clip(wave, -1, 1), "wav"))
        atomic_write_bytes(out / f"source_{n}.wav", encode_audio(u.audio, "wav"))
    atomic_write_bytes(out / "target_reference_0.wav", encode_audio(refs[0].audio, "wav"))

    # What the audio carries of the matched features: the converted audio encoded again,
    # frame by frame against the features it was made from.
    again = frames(waves_out)
    for (entry, conv), f in zip(results, again):
        m = min(len(f), len(conv.feats))
        entry["reencoded_cosine"] = float(np.mean(np.sum(unit(f[:m]) * unit(conv.feats[:m]), axis=1)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sources), 3, figsize=(12, 2.4 * len(sources)), squeeze=False)
    for row, (u, wave) in enumerate(zip(sources, waves_out)):
        _spectrogram(axes[row][0], u.audio, f"source {cfg.source}: {u.key}")
        _spectrogram(axes[row][1], wave, f"converted to {cfg.target} (k={cfg.k})")
        _spectrogram(axes[row][2], refs[row % len(refs)].audio, f"target {cfg.target}: {refs[row % len(refs)].key}")
    fig.suptitle(f"kNN-VC in {what}", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out / "spectrograms.png", dpi=90)

    entries = [e for e, _ in results]
    source_minutes = sum(e["seconds"] for e in entries) / 60
    summary = {k: float(np.mean([e[k] for e in entries])) for k in
               ("smoothness", "cosine_to_target_mean", "cosine_to_source_mean", "source_cosine_to_target_mean",
                "reencoded_cosine", *(("content",) if has_phones else ()))}
    record = {"features": cfg.features, "what": what, "layer": layer, "layer_note": layer_note, "k": cfg.k,
              "window": cfg.window,
              "source": cfg.source, "target": cfg.target, "reference_seconds": round(ref.seconds, 2),
              "reference_utterances": len(refs), "utterances": entries, "mean": summary,
              "seconds": {"total": round(time.perf_counter() - started, 2), "encode": round(encode_seconds, 2),
                          "match": round(match_seconds, 3), "audio": round(audio_seconds, 3)},
              "seconds_per_source_minute": {"match": match_seconds / source_minutes,
                                            "audio": audio_seconds / source_minutes,
                                            "encode": encode_seconds / source_minutes}}
    atomic_write_json(out / "knnvc.json", record)
    log.info("kNN-VC %s -> %s in %s: %d utterances", cfg.source, cfg.target, what, len(sources))
    return record
