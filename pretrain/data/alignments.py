"""External phone alignments into reference label sets (``phones50``, ``phones100``), so that
PNMI (``kmeans quality``) and the probes work on real corpora.

Two sources:

- **Praat TextGrids**, one per utterance, as the Montreal Forced Aligner writes them: the file
  ``<dir>/<key>.TextGrid`` (the utterance key is its path below the corpus root), read with
  ``praatio``; the phone tier (``phones`` by default) must cover the utterance with contiguous
  intervals. A gap or an overlap between intervals is an error naming the file and the time;
  empty intervals are silence.
- **Keyed frame alignments**: a text file of lines ``<key> <phone> <phone> ...``, one phone per
  frame at ``frame_rate`` (what Kaldi's ``ali-to-phones --per-frame`` gives at 100 Hz).

A **phone map** file says what each aligner symbol means: lines ``<aligner phone> <phone>``
(``AH0 ah``, ``spn sil``); the right-hand symbols, in order of first appearance, are the label
set's classes, and ``sil`` (silence: empty intervals) is added first when absent. An aligner
phone the map does not name is an error naming the file, the time and the phone. Utterances of
the shards without an alignment are an error listing how many and the first; an alignment
ending more than ``tolerance`` seconds before or after its audio is too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pretrain.data.labels import settle_label_sets, write_label_meta, write_label_shard
from pretrain.data.shards import read_manifest, shard_index
from pretrain.frames import num_frames, segment_frame_labels
from pretrain.resources import config_path
from pretrain.utils import PretrainError, read_lines

log = logging.getLogger(__name__)

SILENCE = "sil"
SAMPLE_RATE = 16000


def read_phone_map(path: Path) -> tuple[dict[str, str], list[str]]:
    """``({aligner phone: phone}, inventory)``; silence first."""
    mapping: dict[str, str] = {}
    inventory = [SILENCE]
    for number, line in enumerate(read_lines(path, "phone map"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise PretrainError(f"{path}:{number}: expected '<aligner phone> <phone>', got {line!r}")
        if parts[0] in mapping and mapping[parts[0]] != parts[1]:
            raise PretrainError(f"{path}:{number}: '{parts[0]}' mapped twice ({mapping[parts[0]]}, {parts[1]})")
        mapping[parts[0]] = parts[1]
        if parts[1] not in inventory:
            inventory.append(parts[1])
    mapping.setdefault("", SILENCE)
    return mapping, inventory


def textgrid_segments(path: Path, tier: str, mapping: dict[str, str], phone_map: Path,
                      epsilon: float = 1e-4) -> list[tuple[str, float, float]]:
    """Contiguous ``(phone, start s, end s)`` of the tier, mapped; errors name file and time."""
    from praatio import textgrid

    try:
        grid = textgrid.openTextgrid(str(path), includeEmptyIntervals=True)
    except Exception as e:  # noqa: BLE001 - praatio raises several kinds on a malformed file
        raise PretrainError(f"{path}: not a readable TextGrid: {e}") from None
    if tier not in grid.tierNames:
        raise PretrainError(f"{path}: no tier '{tier}' (tiers: {', '.join(grid.tierNames)})")
    entries = sorted(grid.getTier(tier).entries, key=lambda e: e.start)
    segments: list[tuple[str, float, float]] = []
    at = grid.minTimestamp
    for entry in entries:
        if entry.start > at + epsilon:
            raise PretrainError(f"{path}: tier '{tier}' has a gap from {at:.3f} s to {entry.start:.3f} s")
        if entry.start < at - epsilon:
            raise PretrainError(f"{path}: tier '{tier}' has overlapping intervals at {entry.start:.3f} s")
        label = entry.label.strip()
        if label not in mapping:
            raise PretrainError(f"{path}: phone '{label}' at {entry.start:.3f} s is not in the phone map {phone_map}")
        segments.append((mapping[label], entry.start, entry.end))
        at = entry.end
    if at < grid.maxTimestamp - epsilon:
        segments.append((SILENCE, at, grid.maxTimestamp))  # a tier that stops early: silence after
    return segments


def segment_labels(segments: list[tuple[str, float, float]], num_samples: int, rate: int,
                   ids: dict[str, int], where: str, tolerance: float) -> np.ndarray:
    end = segments[-1][2]
    seconds = num_samples / SAMPLE_RATE
    if abs(end - seconds) > tolerance:
        raise PretrainError(f"{where}: the alignment ends at {end:.3f} s but the audio lasts {seconds:.3f} s")
    ends = np.array([min(int(round(e * SAMPLE_RATE)), num_samples) for _, _, e in segments], dtype=np.int64)
    ends[-1] = num_samples
    return segment_frame_labels(np.maximum.accumulate(ends), np.array([ids[p] for p, _, _ in segments]),
                                num_samples, rate)


def read_frame_file(path: Path, mapping: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    where: dict[str, int] = {}
    for number, line in enumerate(read_lines(path, "frame alignment file"), start=1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] in where:
            raise PretrainError(f"{path}:{number}: key '{parts[0]}' again (first on line {where[parts[0]]}); "
                                "each utterance must be aligned once")
        where[parts[0]] = number
        unknown = [(i, p) for i, p in enumerate(parts[1:]) if p not in mapping]
        if unknown:
            raise PretrainError(f"{path}:{number}: phone '{unknown[0][1]}' (frame {unknown[0][0]} of '{parts[0]}') is "
                                "not in the phone map")
        out[parts[0]] = [mapping[p] for p in parts[1:]]
    return out


def import_alignments(shards: str | Path, phone_map: str | Path, textgrids: str | Path | None = None,
                      frames: str | Path | None = None, frame_rate: int = 100, tier: str = "phones",
                      prefix: str = "phones", tolerance: float = 0.05, overwrite: bool = False) -> tuple[list[str], bool]:
    """Write ``<prefix>50`` and ``<prefix>100`` into ``shards``; returns their names and whether
    anything was written. Label
    sets of those names are replaced only with ``overwrite``, and left as they are when they
    already hold exactly these labels."""
    # configs/phone_maps/... is found from any directory, as --config files are.
    shards, phone_map = Path(shards), config_path(phone_map)
    if (textgrids is None) == (frames is None):
        raise PretrainError("give either TextGrids or a frame alignment file")
    mapping, inventory = read_phone_map(phone_map)
    ids = {p: i for i, p in enumerate(inventory)}
    index = shard_index(shards)
    table = read_frame_file(Path(frames), mapping) if frames is not None else None
    missing = [k for k in index if (table is not None and k not in table)
               or (table is None and not (Path(textgrids) / f"{k}.TextGrid").is_file())]
    if missing:
        raise PretrainError(f"{len(missing)} of the {len(index)} utterances of {shards} have no alignment (first: "
                            f"'{missing[0]}', looked for in {textgrids or frames})")
    unknown = sorted(set(table or ()) - set(index))
    if unknown:
        # Most likely alignments of another corpus (or another split): refused like labels import.
        raise PretrainError(f"{frames}: {len(unknown)} keys are not utterances of {shards} (first: '{unknown[0]}')")
    per_rate: dict[int, dict[str, dict[str, np.ndarray]]] = {50: {}, 100: {}}
    for key, (shard, num_samples, _) in index.items():
        if table is not None:
            phones = table[key]
            expected = num_frames(num_samples, frame_rate) if frame_rate in (50, 100) else \
                int(num_samples / SAMPLE_RATE * frame_rate)
            if abs(len(phones) - expected) > 1:
                raise PretrainError(f"{frames}: key '{key}' has {len(phones)} frames, but its {num_samples} samples "
                                    f"give {expected} at {frame_rate} Hz")
            # Frame i of the file is a 25 ms window every 1/frame_rate s, centred at
            # i / frame_rate + 12.5 ms (Kaldi's and our grids): its phone holds up to halfway
            # to the next frame's centre.
            hop, half = 1 / frame_rate, 0.0125
            segments = [(p, 0.0 if i == 0 else (i - 0.5) * hop + half, (i + 0.5) * hop + half)
                        for i, p in enumerate(phones)]
            segments[-1] = (segments[-1][0], segments[-1][1], max(segments[-1][2], num_samples / SAMPLE_RATE))
            where = f"{frames}, key '{key}'"
        else:
            path = Path(textgrids) / f"{key}.TextGrid"
            segments = textgrid_segments(path, tier, mapping, phone_map)
            where = str(path)
        for rate in (50, 100):
            per_rate[rate].setdefault(shard, {})[key] = segment_labels(segments, num_samples, rate, ids, where,
                                                                       tolerance)
    names = [f"{prefix}{rate}" for rate in (50, 100)]
    if settle_label_sets(shards, {f"{prefix}{rate}": (rate, len(inventory), per_rate[rate]) for rate in (50, 100)},
                         overwrite):
        return names, False
    source = {"made_by": "pretrain labels alignments", "phones": inventory, "phone_map": str(phone_map.resolve()),
              "source": str(Path(textgrids or frames).resolve()), "format": "textgrid" if textgrids else "frames"}
    for rate, name in zip((50, 100), names):
        entries = {e["name"]: write_label_shard(shards, name, e["name"], per_rate[rate][e["name"]])
                   for e in read_manifest(shards)["shards"]}
        write_label_meta(shards, name, rate, len(inventory), entries, source)
    return names, True

