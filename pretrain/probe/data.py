"""The evaluation set of the probes: held-out shards with phone labels and speakers.

Every probe works on the 50 Hz grid of the model (``pretrain.frames``): phone labels come from
``phones50``, or from ``phones100`` read at every other frame (100 Hz frame ``2i`` has the
centre of 50 Hz frame ``i``). The speaker is the ``speaker`` field of each utterance's shard
metadata (a synthetic corpus's voice).

Splits are balanced over speakers and decided by a seeded hash of the key: each utterance
gets ``u = sha256(f"{seed}:{key}")`` (its first 8 bytes as a fraction of 2^64); within each
speaker, utterances ranked by ``u`` go to probe-train (the first ``round(n * train_fraction)``),
probe-dev (the next ``round(n * dev_fraction)``) and probe-test (the rest), and every split gets
at least one utterance of a speaker with three or more. So a key's split depends only on its
hash and on the other keys of its speaker (never on shard order or on other speakers), and the
speaker probe sees every speaker in every split (identification, not verification). Utterances
without a speaker are split by ``u`` against the fractions directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data.audio import EXTENSIONS, decode
from pretrain.data.labels import LabelError, LabelSet, fit_length
from pretrain.data.shards import iter_shard, read_manifest
from pretrain.frames import conv_num_frames
from pretrain.phones import PHONES
from pretrain.utils import PretrainError

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def key_hash(key: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0 ** 64


def split_of(key: str, seed: int, train_fraction: float, dev_fraction: float) -> str:
    """The split of an utterance without a speaker: its hash against the fractions."""
    u = key_hash(key, seed)
    if u < train_fraction:
        return "train"
    return "dev" if u < train_fraction + dev_fraction else "test"


def split_counts(n: int, train_fraction: float, dev_fraction: float) -> tuple[int, int]:
    """(train, dev) utterances of a speaker with ``n``; at least one per split from n = 3."""
    n_train, n_dev = round(n * train_fraction), round(n * dev_fraction)
    if n >= 3:
        n_dev = min(max(n_dev, 1), n - 2)
        n_train = min(max(n_train, 1), n - n_dev - 1)
    return n_train, n_dev


def assign_splits(keys: list[str], speakers: list[str | None], seed: int, train_fraction: float,
                  dev_fraction: float) -> list[str]:
    """The split of every utterance (see the module docstring)."""
    out = [""] * len(keys)
    by_speaker: dict[str, list[int]] = {}
    for i, (key, speaker) in enumerate(zip(keys, speakers)):
        if speaker is None:
            out[i] = split_of(key, seed, train_fraction, dev_fraction)
        else:
            by_speaker.setdefault(speaker, []).append(i)
    for members in by_speaker.values():
        ranked = sorted(members, key=lambda i: (key_hash(keys[i], seed), keys[i]))
        n_train, n_dev = split_counts(len(ranked), train_fraction, dev_fraction)
        for rank, i in enumerate(ranked):
            out[i] = "train" if rank < n_train else ("dev" if rank < n_train + n_dev else "test")
    return out


@dataclass
class Utterance:
    key: str
    shard: str
    audio: np.ndarray
    speaker: str | None
    phones: np.ndarray | None
    """Phone id per 50 Hz frame (``conv_num_frames`` of the audio), or None without a reference."""
    split: str


@dataclass
class EvalSet:
    shards: Path
    utterances: list[Utterance]
    reference: str | None
    phone_names: list[str]
    num_phones: int
    silence: int | None
    """Phone id of silence (``sil``), when the inventory has one."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Probe -> why it cannot run on this set."""

    def split(self, name: str) -> list[int]:
        return [i for i, u in enumerate(self.utterances) if u.split == name]

    @property
    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances if u.speaker is not None})

    def describe(self) -> dict:
        counts = {s: len(self.split(s)) for s in SPLITS}
        return {"shards": str(self.shards), "utterances": len(self.utterances),
                "seconds": round(sum(len(u.audio) for u in self.utterances) / 16000, 1),
                "frames": int(sum(conv_num_frames(len(u.audio)) for u in self.utterances)),
                "splits": counts, "speakers": len(self.speakers), "reference": self.reference}


def _reference(shards: Path, reference: str) -> tuple[str | None, LabelSet | None]:
    names = ["phones50", "phones100"] if reference == "auto" else [reference]
    for name in names:
        if (shards / "labels" / name / "meta.json").is_file():
            ls = LabelSet(shards, name)
            if ls.label_rate not in (50, 100):
                raise PretrainError(f"reference label set '{name}' is at {ls.label_rate} Hz; probes need 50 or 100")
            return name, ls
    if reference != "auto":
        raise PretrainError(f"reference label set '{reference}' not found in {shards}/labels")
    return None, None


def _phone_names(ls: LabelSet | None) -> list[str]:
    if ls is None:
        return []
    names = ls.meta.get("provenance", {}).get("phones")
    if isinstance(names, list) and len(names) == ls.num_classes:
        return [str(n) for n in names]
    return list(PHONES) if len(PHONES) == ls.num_classes else [str(i) for i in range(ls.num_classes)]


def load_eval_set(shards: str | Path, reference: str = "auto", split_seed: int = 0, train_fraction: float = 0.6,
                  dev_fraction: float = 0.2, max_utterances: int | None = None) -> EvalSet:
    """Decode every evaluation utterance with its speaker, 50 Hz phone labels and split."""
    shards = Path(shards)
    manifest = read_manifest(shards)
    ref_name, ref = _reference(shards, reference)
    utts: list[Utterance] = []
    for entry in manifest["shards"]:
        name = entry["name"]
        labels = ref.load_shard(name) if ref is not None else None
        for sample in iter_shard(shards / name):
            key = sample["__key__"]
            ext = next((e for e in EXTENSIONS if e in sample), None)
            if ext is None:
                raise PretrainError(f"{shards / name}: sample '{key}' has no audio member")
            audio = decode(sample[ext])
            meta = json.loads(sample["json"]) if "json" in sample else {}
            phones = None
            if ref is not None:
                if key not in labels:
                    raise LabelError(f"reference '{ref_name}', shard {name}: no labels for key '{key}'")
                y = fit_length(labels[key], len(audio), ref.label_rate, ref_name, name, key)
                # 100 Hz frame 2i has the centre of 50 Hz frame i.
                y = y[::2] if ref.label_rate == 100 else y
                phones = _fit(y, conv_num_frames(len(audio)))
            speaker = meta.get("speaker")
            utts.append(Utterance(key, name, audio, None if speaker is None else str(speaker), phones, ""))
            if max_utterances is not None and len(utts) >= max_utterances:
                break
        if max_utterances is not None and len(utts) >= max_utterances:
            break
    if not utts:
        raise PretrainError(f"{shards}: no utterances to probe")
    for u, split in zip(utts, assign_splits([u.key for u in utts], [u.speaker for u in utts], split_seed,
                                            train_fraction, dev_fraction)):
        u.split = split
    names = _phone_names(ref)
    silence = names.index("sil") if "sil" in names else None
    es = EvalSet(shards, utts, ref_name, names, ref.num_classes if ref else 0, silence)
    if ref is None:
        reason = f"no phone reference (phones50 or phones100) in {shards}/labels"
        es.skipped.update(abx=reason, phone=reason, pnmi=reason)
    missing = [u.key for u in utts if u.speaker is None]
    if missing:
        es.skipped["speaker"] = (f"{len(missing)} utterances have no 'speaker' in their shard metadata "
                                 f"(e.g. '{missing[0]}')")
        es.skipped.setdefault("abx", f"ABX groups items by speaker; {len(missing)} utterances have none")
    elif len(es.speakers) < 2:
        es.skipped["speaker"] = f"only {len(es.speakers)} speaker in {shards}: nothing to identify"
    for split in SPLITS:
        if not es.split(split):
            raise PretrainError(f"{shards}: probe-{split} is empty ({len(utts)} utterances); probe more "
                                "utterances or change train_fraction/dev_fraction")
    if "speaker" not in es.skipped:
        for split in SPLITS:
            have = {utts[i].speaker for i in es.split(split)}
            absent = [s for s in es.speakers if s not in have]
            if absent:
                es.skipped["speaker"] = (f"speaker(s) {', '.join(absent[:5])} have no utterance in probe-{split}; "
                                         "the speaker probe needs every speaker in every split")
                break
    return es


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) >= n:
        return y[:n].astype(np.int64)
    return np.concatenate([y, np.repeat(y[-1:], n - len(y))]).astype(np.int64)


def segments(phones: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal frame labels: ``(phone, start, end)`` with ``end`` exclusive."""
    if len(phones) == 0:
        return []
    change = np.flatnonzero(np.diff(phones)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(phones)]])
    return [(int(phones[s]), int(s), int(e)) for s, e in zip(starts, ends)]
