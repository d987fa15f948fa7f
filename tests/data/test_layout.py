"""Real corpus layouts: LibriSpeech (speaker/chapter folders, *.trans.txt) and LibriLight
(per-file .json, recordings of many minutes), long files split at pauses or skipped, and the
deterministic train/valid split. The trees are generated here with real synthetic speech."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from pretrain.config import load_config
from pretrain.config.shards import ShardsBuildConfig
from pretrain.data.layout import WINDOW
from pretrain.data.shards import build_shards, iter_shard, read_manifest
from pretrain.features.extract import shard_utterances

pytestmark = pytest.mark.slow


def speech(tiny_corpus) -> list[np.ndarray]:
    records = [json.loads(line) for line in (tiny_corpus / "utterances.jsonl").read_text().splitlines()]
    return [sf.read(tiny_corpus / r["audio"], dtype="float32")[0] for r in records]


@pytest.fixture(scope="module")
def trees(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    clips = speech(tiny_corpus)
    libri = root / "LibriSpeech" / "dev-clean"
    for i, clip in enumerate(clips[:6]):
        speaker, chapter = ("84", "121123") if i < 3 else ("174", "50561")
        folder = libri / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"{speaker}-{chapter}-{i:04d}.flac", clip, 16000)
        with open(folder / f"{speaker}-{chapter}.trans.txt", "a") as f:
            f.write(f"{speaker}-{chapter}-{i:04d} WORDS OF UTTERANCE {i}\n")
    light = root / "librilight" / "small"
    pause = np.zeros(int(0.4 * 16000), np.float32)
    long = np.concatenate([np.concatenate([c, pause]) for _ in range(200) for c in clips])[:10 * 60 * 16000]
    folder = light / "1001" / "the_book_of_tests"
    folder.mkdir(parents=True)
    sf.write(folder / "chapter_01_reader_64kb.flac", long, 16000)
    (folder / "chapter_01_reader_64kb.json").write_text(json.dumps(
        {"speaker": "1001", "book_meta": {"title": "The Book of Tests"}, "snr": 18.5}))
    short = light / "2002" / "another_book"
    short.mkdir(parents=True)
    sf.write(short / "chapter_02.flac", clips[7], 16000)
    (short / "chapter_02.json").write_text(json.dumps({"speaker": "2002", "snr": 20.1}))
    return libri, light, len(long)


def build(input_dir, out, *overrides):
    cfg = load_config(ShardsBuildConfig, [], [f"input={input_dir}", f"out={out}", "per_shard=4", "jobs=1",
                                              *overrides])
    return build_shards(cfg, progress=False, argv=["test"])


def metas(out) -> dict[str, dict]:
    return {json.loads(s["json"])["key"]: json.loads(s["json"]) for e in read_manifest(out)["shards"]
            for s in iter_shard(out / e["name"])}


def test_librispeech_speakers_chapters_and_transcripts(trees, tmp_path):
    libri, _, _ = trees
    build(libri, tmp_path / "ls", "speaker_from='dir_level 0'")
    meta = metas(tmp_path / "ls")
    assert meta["84/121123/84-121123-0001"]["speaker"] == "84"
    assert meta["84/121123/84-121123-0001"]["chapter"] == "121123"
    assert meta["174/50561/174-50561-0004"]["text"] == "WORDS OF UTTERANCE 4"
    # The same from a regex.
    build(libri, tmp_path / "re", r"speaker_from='regex (?P<speaker>\d+)-(?P<chapter>\d+)-\d+\.flac$'")
    assert {m["speaker"] for m in metas(tmp_path / "re").values()} == {"84", "174"}
    # A deterministic split by speaker: disjoint, complete, the same twice.
    split = {}
    for subset in ("train", "valid"):
        build(libri, tmp_path / subset, "speaker_from='dir_level 0'", f"subset={subset}", "valid_fraction=0.5",
              "split_seed=0")
        split[subset] = {m["speaker"] for m in metas(tmp_path / subset).values()}
    assert split["train"] and split["valid"] and not split["train"] & split["valid"]
    assert split["train"] | split["valid"] == {"84", "174"}
    build(libri, tmp_path / "again", "speaker_from='dir_level 0'", "subset=valid", "valid_fraction=0.5", "split_seed=0")
    assert {m["speaker"] for m in metas(tmp_path / "again").values()} == split["valid"]


def test_a_ten_minute_librilight_file_is_cut_at_pauses(trees, tmp_path):
    _, light, total = trees
    build(light, tmp_path / "ll", "speaker_from='dir_level 0'", "max_duration=20")
    meta = metas(tmp_path / "ll")
    parent = "1001/the_book_of_tests/chapter_01_reader_64kb"
    segments = sorted((m for m in meta.values() if m.get("segment", {}).get("parent") == parent),
                      key=lambda m: m["segment"]["start"])
    assert len(segments) >= 30 and sum(m["num_samples"] for m in segments) == total
    for m in segments:
        assert m["key"] == f"{parent}__{round(m['segment']['start'] * 1000)}"
        assert m["num_samples"] <= 20 * 16000 and m["speaker"] == "1001" and m["meta"]["snr"] == 18.5
    assert all(m["num_samples"] >= 10 * 16000 for m in segments[:-1])
    # Every cut falls in a pause: the 25 ms window around it is (near) silent.
    audio = {k: w for e in read_manifest(tmp_path / "ll")["shards"]
             for k, w in shard_utterances(tmp_path / "ll" / e["name"])}
    joined = np.concatenate([audio[m["key"]] for m in segments])
    for m in segments[1:]:
        cut = round(m["segment"]["start"] * 16000)
        window = joined[cut - WINDOW // 2:cut + WINDOW // 2]
        assert np.mean(window ** 2) < 1e-6, m["key"]
    assert meta["2002/another_book/chapter_02"]["meta"] == {"speaker": "2002", "snr": 20.1}
    # Or left out, and reported.
    manifest = build(light, tmp_path / "skip", "max_duration=20", "long_policy=skip")
    assert manifest["totals"]["utterances"] == 1 and manifest["totals"]["skipped"] == 1
    reason = json.loads((tmp_path / "skip/skipped.jsonl").read_text().splitlines()[0])["reason"]
    assert reason.startswith("longer than max_duration: 600.0 s > 20.0 s (long_policy=skip)")
