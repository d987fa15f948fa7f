from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pretrain.config import load_config
from pretrain.config.shards import ShardsBuildConfig, parse_size
from pretrain.data.audio import decode
from pretrain.data.shards import build_shards, iter_shard, read_manifest, verify_shards
from pretrain.data.sources import key_from_relpath, read_sources
from pretrain.utils import PretrainError

pytestmark = pytest.mark.slow


def build(input_path, out, *overrides) -> dict:
    cfg = load_config(ShardsBuildConfig, [], [f"input={input_path}", f"out={out}", "jobs=2", *overrides])
    return build_shards(cfg, progress=False, argv=["test"])


def all_samples(shard_dir: Path) -> dict[str, dict]:
    manifest = read_manifest(shard_dir)
    return {s["__key__"]: s for entry in manifest["shards"] for s in iter_shard(shard_dir / entry["name"])}


def tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("2.5 mb") == 2_500_000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_keys_from_relative_paths():
    assert key_from_relpath("spk1/utt.flac") == "spk1/utt"
    assert key_from_relpath("a.b/c.d.wav") == "a.b/c_d"  # WebDataset splits at the name's first dot
    assert key_from_relpath("x.wav") == "x"


def test_synthetic_corpus_shards_carry_metadata_and_alignments(small_corpus, small_shards):
    manifest = read_manifest(small_shards)
    assert manifest["totals"]["shards"] == 10 and manifest["totals"]["utterances"] == 40
    assert [s["utterances"] for s in manifest["shards"]] == [4] * 10
    utterances = [json.loads(line) for line in (small_corpus / "utterances.jsonl").read_text().splitlines()]
    samples = all_samples(small_shards)
    assert len(samples) == 40
    for rec in utterances:
        key = f"{rec['voice']}/{rec['utt_id']}"
        sample = samples[key]
        meta = json.loads(sample["json"])
        assert meta["speaker"] == rec["voice"] and meta["text"] == rec["text"]
        assert meta["source_sample_rate"] == 16000 and meta["num_samples"] == rec["num_samples"]
        original, _ = sf.read(small_corpus / rec["audio"], dtype="float32")
        np.testing.assert_array_equal(decode(sample["flac"]), original)  # lossless, no resampling
        assert json.loads(sample["align.json"])["segments"] == json.loads(
            (small_corpus / rec["align"]).read_text())["segments"]
    assert verify_shards(str(small_shards), jobs=2, progress=False) == []
    # The gold phone label sets are complete and keyed.
    meta = json.loads((small_shards / "labels/phones50/meta.json").read_text())
    assert meta["label_rate"] == 50 and meta["num_classes"] == 40 and len(meta["shards"]) == 10


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    src = tmp_path / "src"
    (src / "spk").mkdir(parents=True)
    sf.write(src / "spk/good.wav", tone(1.0, 16000), 16000)
    sf.write(src / "spk/stereo44k.wav", tone(1.0, 44100, channels=2), 44100)
    sf.write(src / "spk/narrow8k.flac", tone(1.5, 8000), 8000)
    sf.write(src / "spk/empty.wav", np.zeros(0), 16000)
    sf.write(src / "spk/short.wav", tone(0.1, 16000), 16000)
    sf.write(src / "spk/silent.wav", np.zeros(16000), 16000)
    nan = tone(1.0, 16000).astype(np.float32)
    nan[100] = np.nan
    sf.write(src / "spk/nan.wav", nan, 16000, subtype="FLOAT")
    (src / "spk/garbage.wav").write_bytes(b"this is not audio at all" * 10)

    manifest = build(src, tmp_path / "out", "per_shard=2")
    samples = all_samples(tmp_path / "out")
    assert sorted(samples) == ["spk/good", "spk/narrow8k", "spk/stereo44k"]
    stereo = json.loads(samples["spk/stereo44k"]["json"])
    assert stereo["source_sample_rate"] == 44100 and stereo["source_channels"] == 2
    assert stereo["num_samples"] == 16000
    assert json.loads(samples["spk/narrow8k"]["json"])["num_samples"] == 24000
    # Resampling keeps the tone's amplitude (a real resampler, not sample dropping).
    assert 0.28 < np.abs(decode(samples["spk/narrow8k"]["flac"])[2000:-2000]).max() < 0.32

    reasons = {json.loads(line)["key"]: json.loads(line)["reason"]
               for line in (tmp_path / "out/skipped.jsonl").read_text().splitlines()}
    assert set(reasons) == {"spk/empty", "spk/short", "spk/silent", "spk/nan", "spk/garbage"}
    assert reasons["spk/empty"].startswith("empty")
    assert reasons["spk/short"].startswith("too short")
    assert reasons["spk/silent"].startswith("silent")
    assert reasons["spk/nan"].startswith("non-finite")
    assert reasons["spk/garbage"].startswith("unreadable")
    assert manifest["totals"]["skipped"] == 5 and manifest["totals"]["utterances"] == 3


def test_key_collision_is_an_error_naming_both_files(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0, 16000), 16000)
    sf.write(tmp_path / "a.flac", tone(1.0, 16000), 16000)
    with pytest.raises(PretrainError, match="'a.flac' and 'a.wav' both map to key 'a'"):
        read_sources(str(tmp_path))


def test_tsv_and_jsonl_manifests(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("x", "y", "z"):
        sf.write(audio / f"{name}.flac", tone(1.0, 16000), 16000)
    (tmp_path / "train.tsv").write_text(f"{audio}\nx.flac\t16000\ny.flac\t16000\n")
    build(tmp_path / "train.tsv", tmp_path / "tsv", "per_shard=5")
    assert sorted(all_samples(tmp_path / "tsv")) == ["x", "y"]
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio": "audio/z.flac", "speaker": "s9", "text": "hi"}) + "\n"
        + json.dumps({"audio": str(audio / "x.flac"), "key": "custom/key"}) + "\n")
    build(tmp_path / "m.jsonl", tmp_path / "jsonl", "per_shard=5")
    samples = all_samples(tmp_path / "jsonl")
    assert sorted(samples) == ["audio/z", "custom/key"]
    assert json.loads(samples["audio/z"]["json"])["speaker"] == "s9"
    (tmp_path / "bad.tsv").write_text(f"{audio}\nx.flac 16000\n")
    with pytest.raises(PretrainError, match=r"bad.tsv:2: expected 'relpath<TAB>nsamples'"):
        read_sources(str(tmp_path / "bad.tsv"))


def test_target_size_cuts_shards_by_pcm_bytes(tmp_path):
    for i in range(6):
        sf.write(tmp_path / f"u{i}.wav", tone(1.0, 16000), 16000)  # 32 kB of 16-bit PCM each
    manifest = build(tmp_path, tmp_path / "out", "target_size=70kB", "audio_format=wav")
    assert [s["utterances"] for s in manifest["shards"]] == [2, 2, 2]
    assert all(s["name"].endswith(".tar") for s in manifest["shards"])
    assert "wav" in next(iter(all_samples(tmp_path / "out").values()))


def test_build_resumes_without_rebuilding_finished_shards(tiny_corpus, tmp_path):
    out = tmp_path / "out"
    first = build(tiny_corpus, out, "per_shard=3")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    # Simulate a build killed while writing shard 2: its tar is a temp file, no statistics.
    (out / "shard-000002.tar").rename(out / "shard-000002.tar.tmp")
    (out / ".build/shard-000002.tar.json").unlink()
    (out / "manifest.json").unlink()
    second = build(tiny_corpus, out, "per_shard=3")
    assert second == first  # same bytes, same checksums
    for name, mtime in mtimes.items():
        if name != "shard-000002.tar":
            assert (out / name).stat().st_mtime_ns == mtime
    # A different build into the same folder is refused unless asked for.
    with pytest.raises(PretrainError, match="different build"):
        build(tiny_corpus, out, "per_shard=5")
    assert build(tiny_corpus, out, "per_shard=5", "overwrite=true")["totals"]["shards"] == 3


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_flac_magic(path: Path, which: int = 1) -> str:
    """Damage the FLAC header of the ``which``-th sample; returns its key."""
    data = bytearray(path.read_bytes())
    pos = -1
    for _ in range(which + 1):
        pos = data.index(b"fLaC", pos + 1)
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    return [s["__key__"] for s in iter_shard(path)][which]


def test_verify_names_flipped_and_truncated_shards(small_shards, tmp_path):
    bad = corrupt_copy(small_shards, tmp_path / "bad")
    key = flip_flac_magic(bad / "shard-000003.tar")
    data = (bad / "shard-000007.tar").read_bytes()
    (bad / "shard-000007.tar").write_bytes(data[: len(data) // 2])
    problems = verify_shards(str(bad), jobs=2, progress=False)
    text = "\n".join(problems)
    assert "shard-000003.tar: sha256" in text
    assert f"shard-000003.tar key {key}:" in text
    assert "shard-000007.tar: sha256" in text
    assert "shard-000007.tar:" in text and ("unreadable" in text or "samples, the manifest says 4" in text)
    assert not any("shard-000001" in p for p in problems)


def test_cli_verify_exit_codes_and_scripts(small_shards, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    ok = subprocess.run([sys.executable, str(repo / "shards/verify.py"), str(small_shards), "--no-progress"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "ok: 10 shards, 40 utterances" in ok.stdout
    bad = corrupt_copy(small_shards, tmp_path / "bad")
    flip_flac_magic(bad / "shard-000004.tar")
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "shards", "verify", str(bad), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "BAD shard-000004.tar: sha256" in proc.stderr and "problems in" in proc.stderr


def test_the_fast_tar_reader_matches_tarfile_and_hands_it_what_it_does_not_read(tmp_path):
    import io
    import tarfile

    from pretrain.data.shards import _tar_members

    def write(path, names, fmt):
        with tarfile.open(path, "w", format=fmt) as tar:
            for i, name in enumerate(names):
                data = bytes(range(256)) * (i + 1) + b"x" * i  # sizes on and off the 512 grid
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    def reference(path):
        with tarfile.open(path) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]

    plain, mixed = tmp_path / "plain.tar", tmp_path / "mixed.tar"
    write(plain, [f"utt{i}.{ext}" for i in range(3) for ext in ("flac", "json")], tarfile.USTAR_FORMAT)
    # A long name (a pax header) midway: the members before it come from the fast reader,
    # the rest from tarfile, none twice.
    write(mixed, ["a.flac", "a.json", "d/" + "b" * 120 + ".flac", "c.flac"], tarfile.PAX_FORMAT)
    for path in (plain, mixed):
        assert [(m["fname"], m["data"]) for m in _tar_members(str(path))] == reference(path)
    # A damaged header is an error (the loader's damaged-shard path), not garbage samples.
    data = bytearray(plain.read_bytes())
    data[512 * 2 + 10] ^= 0x01  # the second header's name (the first member is 256 bytes, one block)
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError, match="bad tar header checksum"):
        list(_tar_members(str(tmp_path / "bad.tar")))
