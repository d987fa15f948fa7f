"""What a corpus's layout says about its utterances, and long recordings cut to size.

- **Speaker and chapter** from the path below the corpus root (``speaker_from``): ``dir_level
  N`` takes the N-th folder (LibriSpeech ``SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac``: level 0,
  the chapter being level 1), ``regex`` named groups ``speaker`` and ``chapter``.
- **Transcripts**: LibriSpeech keeps one ``SPEAKER-CHAPTER.trans.txt`` per chapter folder, lines
  ``<utterance id> <TEXT>``; the id is the audio file's stem.
- **Side metadata**: LibriLight keeps a ``<stem>.json`` beside each ``<stem>.flac`` (speaker,
  book, SNR, voice activity); it goes into the utterance's metadata whole, as ``meta``.
- **Subsets**: a deterministic train/valid split by a hash of (seed, speaker) or (seed, key).
- **Long recordings** (LibriLight files run for many minutes): ``split_points`` cuts them into
  segments of at most ``max_duration`` seconds at low-energy points. The energy detector: the
  mean square of 25 ms windows every 10 ms; each cut is the quietest window centre between
  half and all of ``max_duration`` after the previous cut, so a segment is never shorter than
  half the limit (except the last) and cuts fall in pauses where the recording has any.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from pretrain.data.sources import SourceItem
from pretrain.utils import PretrainError

WINDOW, HOP = 400, 160
"""Energy detector: 25 ms windows every 10 ms at 16 kHz."""


def _speaker(rel: str, rule: str) -> dict:
    kind, _, arg = rule.partition(" ")
    folders = PurePosixPath(rel).parts[:-1]
    if kind == "dir_level":
        level = int(arg)
        if level >= len(folders):
            raise PretrainError(f"speaker_from '{rule}': '{rel}' has only {len(folders)} folder levels")
        out = {"speaker": folders[level]}
        if level + 1 < len(folders):
            out["chapter"] = folders[level + 1]
        return out
    match = re.search(arg, rel)
    if match is None:
        raise PretrainError(f"speaker_from '{rule}' does not match '{rel}'")
    return {k: v for k, v in match.groupdict().items() if k in ("speaker", "chapter") and v is not None}


def _transcripts(folder: Path, cache: dict) -> dict[str, str]:
    if folder not in cache:
        texts: dict[str, str] = {}
        for path in sorted(folder.glob("*.trans.txt")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                utt, _, text = line.partition(" ")
                if not text.strip():
                    raise PretrainError(f"{path}:{number}: expected '<utterance id> <text>', got {line!r}")
                texts[utt] = text.strip()
        cache[folder] = texts
    return cache[folder]


def annotate(items: list[SourceItem], cfg) -> list[SourceItem]:
    """Each item with the speaker, chapter, transcript and side metadata its layout gives."""
    cache: dict = {}
    out = []
    for item in items:
        extra = dict(item.extra)
        if cfg.speaker_from:
            extra.update(_speaker(item.source, cfg.speaker_from))
        audio = Path(item.path)
        if cfg.transcripts and "text" not in extra:
            text = _transcripts(audio.parent, cache).get(audio.name.split(".")[0])
            if text is not None:
                extra["text"] = text
        side = audio.with_suffix(".json")
        if cfg.side_json and side.is_file() and "align" not in extra:
            try:
                extra["meta"] = json.loads(side.read_text())
            except ValueError as e:
                raise PretrainError(f"{side}: not valid JSON: {e}") from None
        out.append(replace(item, extra=extra))
    return out


def in_subset(item: SourceItem, cfg) -> bool:
    """Whether ``item`` belongs to ``cfg.subset`` (always, for ``all``)."""
    if cfg.subset == "all":
        return True
    unit = item.extra.get("speaker") if cfg.split_by == "speaker" else None
    token = f"{cfg.split_seed}:{'speaker:' + str(unit) if unit is not None else 'key:' + item.key}"
    draw = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "big") / 2**64
    return (draw < cfg.valid_fraction) == (cfg.subset == "valid")


def split_points(audio: np.ndarray, max_samples: int) -> list[int]:
    """Segment boundaries ``[0, c1, ..., len(audio)]``: every segment at most ``max_samples``
    long, each cut at the quietest 10 ms step between half and all of the limit."""
    cuts = [0]
    while len(audio) - cuts[-1] > max_samples:
        lo, hi = cuts[-1] + max_samples // 2, cuts[-1] + max_samples
        region = audio[lo:hi].astype(np.float64)
        count = (len(region) - WINDOW) // HOP + 1
        power = np.convolve(region ** 2, np.ones(WINDOW) / WINDOW, mode="valid")[::HOP][:count]
        cuts.append(lo + int(np.argmin(power)) * HOP + WINDOW // 2)
    return cuts + [len(audio)]
