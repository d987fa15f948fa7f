"""The corpus to shard, read from a folder of audio, a fairseq TSV or a JSONL manifest.

Every utterance gets a stable key derived from its relative path: the path without its
extension, with dots in the file name replaced by ``_`` (WebDataset splits a member name at the
first dot of its base name). Two files that map to the same key are an error naming both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pretrain.utils import PretrainError

AUDIO_SUFFIXES = {".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".sph"}


@dataclass(frozen=True)
class SourceItem:
    key: str
    path: str
    """Absolute path of the audio file."""
    source: str
    """Path as the corpus names it (relative where it was relative), for reports."""
    extra: dict = field(default_factory=dict, hash=False, compare=False)
    """Optional speaker, text, alignment path and sample count from the manifest."""


def key_from_relpath(rel: str) -> str:
    p = PurePosixPath(rel)
    stem = p.name[: p.name.rfind(".")] if "." in p.name else p.name
    stem = stem.replace(".", "_")
    if not stem:
        raise PretrainError(f"cannot derive a key from '{rel}'")
    return str(p.with_name(stem)) if str(p.parent) != "." else stem


def read_sources(input_path: str) -> list[SourceItem]:
    """Every utterance of the corpus at ``input_path``, in a stable order."""
    path = Path(input_path)
    if path.is_dir():
        if (path / "utterances.jsonl").is_file() and (path / "corpus.json").is_file():
            items = _read_jsonl(path / "utterances.jsonl", synthetic=True)
        else:
            items = _read_tree(path)
    elif path.is_file() and path.suffix == ".tsv":
        items = _read_tsv(path)
    elif path.is_file() and path.suffix in (".jsonl", ".json"):
        items = _read_jsonl(path)
    elif not path.exists():
        raise PretrainError(f"corpus input {path} does not exist")
    else:
        raise PretrainError(f"corpus input {path} is neither a folder, a .tsv nor a .jsonl manifest")
    if not items:
        raise PretrainError(f"corpus input {path} holds no audio")
    _check_unique(items)
    return items


def _read_tree(root: Path) -> list[SourceItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                items.append(SourceItem(key_from_relpath(rel), str(full.resolve()), rel))
    return items


def _read_tsv(manifest: Path) -> list[SourceItem]:
    lines = manifest.read_text().splitlines()
    if not lines:
        raise PretrainError(f"{manifest}: empty TSV manifest (the first line must be the root folder)")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = (manifest.parent / root).resolve()
    items = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise PretrainError(f"{manifest}:{lineno}: expected 'relpath<TAB>nsamples', got {line!r}")
        rel = parts[0].strip()
        items.append(SourceItem(key_from_relpath(rel), str(root / rel), rel,
                                {"num_samples": int(parts[1])}))
    return items


def _read_jsonl(manifest: Path, synthetic: bool = False) -> list[SourceItem]:
    items = []
    base = manifest.parent
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PretrainError(f"{manifest}:{lineno}: not valid JSON: {e}") from None
        if not isinstance(record, dict) or "audio" not in record:
            raise PretrainError(f"{manifest}:{lineno}: each line needs an 'audio' path")
        rel = str(record["audio"])
        full = Path(rel) if Path(rel).is_absolute() else base / rel
        if "key" in record:
            key = str(record["key"])
            if not key or "." in PurePosixPath(key).name:
                raise PretrainError(f"{manifest}:{lineno}: key {key!r} is empty or has a dot in its name")
        elif synthetic:
            # A synthetic corpus keeps audio under audio/<voice>/: the key is the path below it.
            key = key_from_relpath(str(PurePosixPath(rel).relative_to("audio")))
        else:
            key = key_from_relpath(rel)
        extra = {}
        speaker = record.get("speaker", record.get("voice"))
        if speaker is not None:
            extra["speaker"] = str(speaker)
        if "text" in record:
            extra["text"] = str(record["text"])
        if record.get("align"):
            align = Path(record["align"])
            extra["align"] = str(align if align.is_absolute() else base / align)
        items.append(SourceItem(key, str(full.resolve()), rel, extra))
    return items


def _check_unique(items: list[SourceItem]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise PretrainError(
                f"key collision: '{seen[item.key]}' and '{item.source}' both map to key '{item.key}'")
        seen[item.key] = item.source
