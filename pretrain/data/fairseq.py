"""fairseq's label files, both ways: a ``.tsv`` + ``.km`` pair in, a keyed label set out, and
back.

fairseq's HuBERT recipe keeps labels by *position*: line ``i`` of ``<split>.km`` (frame labels,
space-separated) belongs to line ``i + 1`` of ``<split>.tsv`` (the first line is the audio root,
then ``relpath<TAB>num_samples``). Import turns each position into the utterance's key, the
way ``pretrain shards build`` keys a TSV corpus (``pretrain.data.sources.key_from_relpath``),
and stores the labels keyed (``pretrain.data.labels``): the shards may hold the utterances in
any order and any grouping. What fairseq users hit most, a ``.km`` of another length than its
``.tsv`` or a line whose label count does not fit its audio, is an error naming the file, the
line and both lengths.

Export writes, for every utterance of the shards in shard order, the ``.tsv`` line (its
``source`` path below the shards' recorded corpus root, its sample count) and the ``.km`` line,
and ``dict.km.txt`` (one ``<label> 1`` line per class, as fairseq's HuBERT recipe makes it: the
dictionary its HuBERT task loads). A ``.tsv`` line names a whole 16 kHz mono file that fairseq
reads as it is, so an utterance that is not one refuses the export, naming it: a segment cut
from a longer file by ``max_duration``, a source resampled to 16 kHz, or one mixed down to mono.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from pretrain.data.labels import (LENGTH_TOLERANCE, LabelError, LabelSet, settle_label_sets, write_label_meta,
                                  write_label_shard)
from pretrain.data.shards import iter_shard, read_manifest, shard_index
from pretrain.data.sources import key_from_relpath
from pretrain.frames import num_frames
from pretrain.utils import PretrainError, atomic_write_bytes, read_lines, settle_existing

log = logging.getLogger(__name__)


def read_tsv_km(tsv: Path, km: Path) -> list[tuple[str, int, np.ndarray, int]]:
    """``(relpath, num_samples, labels, km line number)`` for every line pair; the errors
    fairseq users meet, named."""
    tsv_lines = read_lines(tsv, "fairseq .tsv file")
    if not tsv_lines:
        raise PretrainError(f"{tsv}: empty (the first line must be the audio root)")
    entries = [(n, line) for n, line in enumerate(tsv_lines[1:], start=2) if line.strip()]
    km_lines = read_lines(km, "fairseq .km file")
    while km_lines and not km_lines[-1].strip():
        km_lines.pop()
    if len(km_lines) != len(entries):
        raise PretrainError(f"{km} has {len(km_lines)} lines but {tsv} lists {len(entries)} utterances (lines 2-"
                            f"{len(tsv_lines)}): line i of the .km must hold the labels of utterance i of the .tsv")
    out = []
    for (tsv_line, line), (km_number, km_line) in zip(entries, enumerate(km_lines, start=1)):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise PretrainError(f"{tsv}:{tsv_line}: expected 'relpath<TAB>num_samples', got {line!r}")
        try:
            labels = np.array([int(x) for x in km_line.split()], dtype=np.int64)
        except ValueError:
            raise PretrainError(f"{km}:{km_number}: not a line of integer labels: {km_line[:80]!r}") from None
        out.append((parts[0].strip(), int(parts[1]), labels, km_number))
    return out


def import_fairseq(shards: str | Path, tsv: str | Path, km: str | Path, name: str, num_classes: int | None,
                   rate: int, overwrite: bool = False) -> tuple[dict, bool]:
    """Write the label set ``name`` into ``shards`` from a ``.tsv`` + ``.km`` pair; returns its
    meta and whether anything was written. Every utterance of the shards must be labelled; extra ``.tsv`` lines are an error. An
    existing set of that name is replaced only with ``overwrite``, and left as it is when it
    already holds exactly these labels."""
    shards, tsv, km = Path(shards), Path(tsv), Path(km)
    rows = read_tsv_km(tsv, km)
    index = shard_index(shards)
    # A .tsv line names its audio as the corpus did: the shards keep that path per utterance
    # (a synthesized corpus keys below audio/, so the path is the surer match).
    by_source = {source: key for key, (_, _, source) in index.items() if source}
    by_shard: dict[str, dict[str, np.ndarray]] = {}
    top = 0
    for rel, num_samples, labels, line in rows:
        key = by_source.get(rel) or key_from_relpath(rel)
        if key not in index:
            raise PretrainError(f"{tsv}: the utterance of .km line {line} (key '{key}') is not in the shards {shards}")
        shard, stored, _ = index[key]
        if stored != num_samples:
            raise PretrainError(f"{tsv}: key '{key}' has {num_samples} samples there but {stored} in {shard}: "
                                "another version of the audio")
        expected = num_frames(num_samples, rate)
        if abs(len(labels) - expected) > LENGTH_TOLERANCE or not len(labels):
            raise PretrainError(f"{km}:{line}: {len(labels)} labels, but key '{key}' ({num_samples} samples) has "
                                f"{expected} frames at {rate} Hz")
        if (labels < 0).any():
            raise PretrainError(f"{km}:{line}: negative label {int(labels.min())}")
        if key in by_shard.get(shard, {}):
            raise PretrainError(f"{tsv}: key '{key}' is listed twice (second time for .km line {line})")
        by_shard.setdefault(shard, {})[key] = labels
        top = max(top, int(labels.max()))
    missing = [k for k in index if k not in by_shard.get(index[k][0], {})]
    if missing:
        raise PretrainError(f"{tsv} labels {len(rows)} utterances, but {len(missing)} of the shards' {len(index)} have "
                            f"none (first: '{missing[0]}'); import a .tsv/.km pair covering the shards")
    classes = top + 1 if num_classes is None else num_classes
    if top >= classes:
        raise PretrainError(f"{km}: label {top} does not fit num_classes={classes}")
    if settle_label_sets(shards, {name: (rate, classes, by_shard)}, overwrite):
        return LabelSet(shards, name).meta, False
    entries = {}
    for entry in read_manifest(shards)["shards"]:
        labels = by_shard[entry["name"]]
        entries[entry["name"]] = write_label_shard(shards, name, entry["name"], labels)
    provenance = {"made_by": "pretrain labels import", "format": "fairseq",
                  "tsv": str(tsv.resolve()), "tsv_sha256": hashlib.sha256(tsv.read_bytes()).hexdigest(),
                  "km": str(km.resolve()), "km_sha256": hashlib.sha256(km.read_bytes()).hexdigest()}
    write_label_meta(shards, name, rate, classes, entries, provenance)
    return LabelSet(shards, name).meta, True


def corpus_root(shards: Path) -> str:
    """Where the shards' ``source`` paths are relative to: the input of their build (a folder,
    or a TSV manifest's root line)."""
    try:
        source = Path(yaml.safe_load((shards / "config.yaml").read_text())["input"])
    except (OSError, KeyError, TypeError, ValueError):
        return "."
    if source.suffix == ".tsv" and source.is_file():
        root = Path(source.read_text().splitlines()[0].strip())
        return str(root if root.is_absolute() else (source.parent / root).resolve())
    if source.suffix in (".jsonl", ".json"):
        return str(source.parent.resolve())
    return str(source.resolve())


def _not_a_whole_file(meta: dict) -> str | None:
    """Why fairseq, reading this utterance's ``source`` as a .tsv line, would not get its audio."""
    segment = meta.get("segment")
    if segment:
        return (f"it is {segment['start']:.2f}-{segment['end']:.2f} s of {meta.get('source')} (split by "
                "max_duration), and a .tsv line names a whole file")
    rate = meta.get("source_sample_rate")
    if rate not in (None, 16000):
        return f"its source {meta.get('source')} is {rate} Hz (resampled to 16 kHz here), and fairseq reads it as it is"
    if meta.get("source_channels", 1) != 1:
        return (f"its source {meta.get('source')} has {meta['source_channels']} channels (mixed down here), and "
                "fairseq reads it as it is")
    return None


def export_fairseq(shards: str | Path, name: str, out: str | Path, split: str,
                   overwrite: bool = False) -> tuple[Path, Path, bool]:
    """Write ``<out>/<split>.tsv``, ``<out>/<split>.km`` and ``<out>/dict.km.txt`` for the label
    set ``name`` (every utterance, in shard order); returns the .tsv and .km paths and whether
    anything was written. Files already there are replaced only with ``overwrite``, and left
    as they are when they already hold exactly these bytes."""
    shards, out = Path(shards), Path(out)
    tsv, km, dictionary = out / f"{split}.tsv", out / f"{split}.km", out / "dict.km.txt"
    labels = LabelSet(shards, name)
    tsv_lines, km_lines = [corpus_root(shards)], []
    for entry in read_manifest(shards)["shards"]:
        stored = labels.load_shard(entry["name"])
        for sample in iter_shard(shards / entry["name"]):
            meta = json.loads(sample["json"])
            key = sample["__key__"]
            if key not in stored:
                raise LabelError(f"label set '{name}', shard {entry['name']}: no labels for key '{key}'")
            why = _not_a_whole_file(meta)
            if why:
                raise PretrainError(f"shard {entry['name']}, key '{key}': fairseq's .tsv cannot address this "
                                    f"utterance: {why}. Export from shards built from 16 kHz mono files without "
                                    "max_duration, or train on these shards with pretrain")
            source = str(meta.get("source") or PurePosixPath(key).with_suffix(".flac"))
            tsv_lines.append(f"{source}\t{meta['num_samples']}")
            km_lines.append(" ".join(map(str, stored[key].tolist())))
    texts = {tsv: ("\n".join(tsv_lines) + "\n").encode(), km: ("\n".join(km_lines) + "\n").encode(),
             dictionary: "".join(f"{i} 1\n" for i in range(labels.num_classes)).encode()}
    if settle_existing(texts, overwrite, "or choose another out or split"):
        return tsv, km, False
    for path, data in texts.items():
        atomic_write_bytes(path, data)
    return tsv, km, True
