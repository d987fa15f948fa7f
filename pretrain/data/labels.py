"""Frame-label sidecars: ``<shards>/labels/<name>/``, keyed by utterance key, never by position.

Layout of a label set::

    labels/<name>/meta.json          format_version, name, label_rate (50 or 100 Hz),
                                     num_classes, provenance (free-form: who made it and how),
                                     shards: {shard name: {"utterances": n, "sha256": ...}}
    labels/<name>/shard-NNNNNN.npz   keys (unicode array), offsets (int64, n + 1),
                                     labels (int32, concatenated); utterance keys[i] has
                                     labels[offsets[i]:offsets[i + 1]]

Audio shards are never rewritten: a label set is added, replaced or deleted on its own. Each
file is written atomically; ``meta.json`` is written last and lists the shard files it covers
with their sha256, so a half-written label set is never mistaken for a complete one, and a
reader refuses a file that does not match (rewritten by another run, or damaged). Names are
single path components (``pretrain.utils.safe_name``).

The reader checks every utterance's label count against the frame count its audio implies at
the label rate (``pretrain.frames``): one frame of difference is tolerated (the last frame is
cut or repeated, as fairseq does for rounding differences between front ends); more is an
error naming the shard, the key and both lengths.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from pretrain.frames import num_frames, segment_frame_labels
from pretrain.utils import PretrainError, atomic_write_bytes, atomic_write_json, safe_name

FORMAT_VERSION = 1
LENGTH_TOLERANCE = 1


class LabelError(PretrainError):
    """A label set does not fit the audio: a missing key or a wrong frame count."""


def _shard_file(shard: str) -> str:
    return shard.removesuffix(".tar") + ".npz"


def label_dir(shard_dir: str | Path, name: str) -> Path:
    return Path(shard_dir) / "labels" / safe_name(name, "label set name")


def write_label_shard(shard_dir: str | Path, name: str, shard: str,
                      labels: Mapping[str, np.ndarray]) -> dict:
    """Write the labels of one audio shard; returns its entry for ``meta.json``."""
    keys = list(labels)
    arrays = [np.asarray(labels[k], dtype=np.int32).reshape(-1) for k in keys]
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys, dtype=str), offsets=offsets,
             labels=np.concatenate(arrays) if arrays else np.zeros(0, np.int32))
    data = buf.getvalue()
    atomic_write_bytes(label_dir(shard_dir, name) / _shard_file(shard), data)
    return {"utterances": len(keys), "sha256": hashlib.sha256(data).hexdigest()}


def write_label_meta(shard_dir: str | Path, name: str, label_rate: int, num_classes: int,
                     shards: Mapping[str, dict], provenance: Mapping) -> None:
    if label_rate not in (50, 100):
        raise ValueError(f"label_rate must be 50 or 100 Hz, not {label_rate}")
    atomic_write_json(label_dir(shard_dir, name) / "meta.json", {
        "format_version": FORMAT_VERSION, "name": name, "label_rate": label_rate,
        "num_classes": num_classes, "provenance": dict(provenance), "shards": dict(shards),
    })


def _holds(shard_dir: str | Path, name: str, label_rate: int, num_classes: int,
           by_shard: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
    try:
        old = LabelSet(shard_dir, name)
        if (old.label_rate, old.num_classes, set(old.meta["shards"])) != (label_rate, num_classes, set(by_shard)):
            return False
        for shard, labels in by_shard.items():
            stored = old.load_shard(shard)
            if stored.keys() != labels.keys() or any(not np.array_equal(stored[k], np.asarray(v))
                                                     for k, v in labels.items()):
                return False
    except (LabelError, KeyError, TypeError, ValueError):  # damaged: not these labels
        return False
    return True


def settle_label_sets(shard_dir: str | Path, sets: Mapping[str, tuple[int, int, Mapping[str, Mapping]]],
                      overwrite: bool) -> bool:
    """Before writing the label sets ``{name: (label_rate, num_classes, {shard: {key: labels}})}``:
    True when each already exists holding exactly these labels (a rerun with identical inputs:
    nothing to write); False when they may be written; otherwise ``LabelError`` naming those that
    exist, and how to replace them. A label set is someone's k-means, alignments or gold labels:
    never replaced unasked."""
    there = [n for n in sets if (label_dir(shard_dir, n) / "meta.json").is_file()]
    if there and len(there) == len(sets) and all(_holds(shard_dir, n, *sets[n]) for n in sets):
        return True
    if there and not overwrite:
        paths = [str(label_dir(shard_dir, n)) for n in there]
        raise LabelError(f"label set{'s' if len(there) > 1 else ''} {', '.join(paths)} already exist"
                         f"{'' if len(there) > 1 else 's'} with other labels; set overwrite=true to replace "
                         f"{'them' if len(there) > 1 else 'it'}")
    return False


class LabelSet:
    """A complete label set, opened for reading."""

    def __init__(self, shard_dir: str | Path, name: str):
        self.dir = label_dir(shard_dir, name)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise LabelError(f"label set '{name}' not found: {meta_path} does not exist")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise LabelError(f"{meta_path}: format_version {self.meta.get('format_version')} "
                             f"is not {FORMAT_VERSION}")
        self.name = name
        self.label_rate: int = self.meta["label_rate"]
        self.num_classes: int = self.meta["num_classes"]

    def load_shard(self, shard: str) -> dict[str, np.ndarray]:
        if shard not in self.meta["shards"]:
            raise LabelError(f"label set '{self.name}' has no labels for shard {shard}")
        path = self.dir / _shard_file(shard)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LabelError(f"label set '{self.name}': {path} unreadable: {e}") from None
        expected = self.meta["shards"][shard].get("sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            # Rewritten since meta.json was (another run writing a set of the same name, an
            # interrupted assign) or damaged: these are not the labels the set describes.
            raise LabelError(f"label set '{self.name}': {path} does not match the sha256 in {self.dir}/meta.json "
                             "(rewritten by another run or damaged); assign the label set again")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                keys, offsets, labels = z["keys"], z["offsets"], z["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise LabelError(f"label set '{self.name}': {path} unreadable: {e}") from None
        return {str(k): labels[offsets[i]:offsets[i + 1]] for i, k in enumerate(keys)}

    def fit(self, labels: Mapping[str, np.ndarray], shard: str, key: str, num_samples: int) -> np.ndarray:
        """The labels of ``key`` with exactly the frame count of its audio, or ``LabelError``."""
        if key not in labels:
            raise LabelError(f"label set '{self.name}', shard {shard}: no labels for key '{key}'")
        return fit_length(labels[key], num_samples, self.label_rate, self.name, shard, key)


def fit_length(labels: np.ndarray, num_samples: int, rate: int, name: str, shard: str, key: str) -> np.ndarray:
    expected = num_frames(num_samples, rate)
    got = len(labels)
    if abs(got - expected) > LENGTH_TOLERANCE or (got == 0 and expected > 0):
        raise LabelError(
            f"label set '{name}', shard {shard}, key '{key}': {got} labels, but {num_samples} "
            f"samples give {expected} frames at {rate} Hz")
    if got > expected:
        return labels[:expected]
    if got < expected:
        return np.concatenate([labels, np.repeat(labels[-1:], expected - got)])
    return labels


def alignment_frame_labels(align: dict, num_samples: int, source_rate: int, rate: int,
                           phone_ids: Mapping[str, int]) -> np.ndarray:
    """Frame labels at ``rate`` from a synthetic corpus alignment (segments in source samples)."""
    scale = 16000 / source_rate
    ends = np.array([int(round(e * scale)) for _, _, e in align["segments"]], dtype=np.int64)
    ends[-1] = num_samples  # resampling may round the length differently
    ids = np.array([phone_ids[p] for p, _, _ in align["segments"]])
    return segment_frame_labels(np.maximum.accumulate(ends), ids, num_samples, rate)
