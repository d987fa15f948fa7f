"""fairseq's .tsv + .km label files to and from keyed label sets."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from pretrain.data.labels import LabelSet
from pretrain.data.shards import read_manifest
from pretrain.stages import execute
from pretrain.utils import PretrainError


@pytest.fixture()
def shards(small_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(small_shards, copy)
    return copy


def labels_of(shards, name) -> dict:
    labels = LabelSet(shards, name)
    return {k: v for s in read_manifest(shards)["shards"] for k, v in labels.load_shard(s["name"]).items()}


def test_export_then_import_in_another_order_gives_the_same_keyed_labels(shards, tmp_path):
    assert execute(["labels", "export", "--shards", str(shards), "--name", "phones50", "--out", str(tmp_path / "fs"),
                    "split=train"]) == 0
    tsv, km = (tmp_path / "fs/train.tsv").read_text().splitlines(), (tmp_path / "fs/train.km").read_text().splitlines()
    assert len(tsv) == len(km) + 1 == 41 and "\t" in tsv[1]
    # The dictionary fairseq's HuBERT task loads: a "<label> <count>" line per class, in order.
    classes = LabelSet(shards, "phones50").num_classes
    assert (tmp_path / "fs/dict.km.txt").read_text() == "".join(f"{i} 1\n" for i in range(classes))
    # fairseq keeps labels by position: shuffle both files the same way; keys keep them right.
    pairs = list(zip(tsv[1:], km))
    random.Random(0).shuffle(pairs)
    (tmp_path / "s.tsv").write_text("\n".join([tsv[0], *(p[0] for p in pairs)]) + "\n")
    (tmp_path / "s.km").write_text("\n".join(p[1] for p in pairs) + "\n")
    assert execute(["labels", "import", "--shards", str(shards), "--tsv", str(tmp_path / "s.tsv"), "--km",
                    str(tmp_path / "s.km"), "--name", "fs_phones"]) == 0
    theirs, ours = labels_of(shards, "fs_phones"), labels_of(shards, "phones50")
    assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
    meta = LabelSet(shards, "fs_phones").meta
    assert meta["label_rate"] == 50 and meta["provenance"]["format"] == "fairseq"


def test_the_mistakes_fairseq_users_make_are_named(shards, tmp_path):
    from pretrain.data.fairseq import export_fairseq, import_fairseq

    tsv, km, _ = export_fairseq(shards, "phones50", tmp_path, "train")
    lines = km.read_text().splitlines()
    short = tmp_path / "short.km"
    short.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(PretrainError, match=rf"{short} has 39 lines but {tsv} lists 40 utterances"):
        import_fairseq(shards, tsv, short, "x", None, 50)
    cut = tmp_path / "cut.km"
    cut.write_text("\n".join([lines[0], " ".join(lines[1].split()[:-5]), *lines[2:]]) + "\n")
    with pytest.raises(PretrainError, match=rf"{cut}:2: \d+ labels, but key '.*' \(\d+ samples\) has \d+ frames at 50 Hz"):
        import_fairseq(shards, tsv, cut, "x", None, 50)
    # 100 Hz labels read as 50 Hz (the rate is the other classic slip) fail the same way.
    with pytest.raises(PretrainError, match=r":1: \d+ labels, but key .* frames at 100 Hz"):
        import_fairseq(shards, tsv, km, "x", None, 100)
    alien = tmp_path / "alien.tsv"
    rows = tsv.read_text().splitlines()
    alien.write_text("\n".join([rows[0], "elsewhere/u1.wav\t16000", *rows[2:]]) + "\n")
    with pytest.raises(PretrainError, match=r"\.km line 1 \(key 'elsewhere/u1'\) is not in the shards"):
        import_fairseq(shards, alien, km, "x", None, 50)
    with pytest.raises(PretrainError, match="does not fit num_classes=3"):
        import_fairseq(shards, tsv, km, "x", 3, 50)


def test_a_tsv_that_is_not_text_or_a_folder_is_one_line(small_shards, tmp_path, capsys):
    (tmp_path / "bad.tsv").write_bytes(b"/root\n\xff\xfeaudio.flac\t16000\n")
    (tmp_path / "x.km").write_text("1 2 3\n")
    for tsv, said in ((tmp_path / "bad.tsv", "not UTF-8 text"), (tmp_path, "a folder, where a fairseq .tsv file")):
        assert execute(["labels", "import", "--shards", str(small_shards), "--tsv", str(tsv), "--km",
                        str(tmp_path / "x.km"), "--name", "fresh"]) == 1
        err = capsys.readouterr().err
        assert f"{tsv}: {said}" in err and "Traceback" not in err, err


def _wav_shards(tmp_path, rate: int, seconds: float, *options: str):
    import soundfile as sf

    from pretrain.config import load_config
    from pretrain.config.shards import ShardsBuildConfig
    from pretrain.data.labels import write_label_meta, write_label_shard
    from pretrain.data.shards import build_shards, iter_shard
    from pretrain.frames import num_frames

    corpus = tmp_path / "corpus" / "spk"
    corpus.mkdir(parents=True)
    t = np.arange(int(seconds * rate)) / rate
    # speech-like bursts with quiet gaps, so max_duration finds low-energy points to cut at
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)).astype(np.float32)
    sf.write(corpus / "long.wav", wave, rate)
    out = tmp_path / "shards"
    build_shards(load_config(ShardsBuildConfig, [], [f"input={tmp_path / 'corpus'}", f"out={out}", *options]),
                 progress=False, argv=["test"])
    by_shard = {}
    for entry in read_manifest(out)["shards"]:
        keys = {s["__key__"]: json.loads(s["json"])["num_samples"] for s in iter_shard(out / entry["name"])}
        by_shard[entry["name"]] = write_label_shard(out, "km", entry["name"],
                                                    {k: np.zeros(num_frames(n, 50), np.int64) for k, n in keys.items()})
    write_label_meta(out, "km", 50, 2, by_shard, {"source": "test"})
    return out


@pytest.mark.parametrize("case", ["segment", "resampled"])
def test_an_export_fairseq_could_not_read_right_is_refused_naming_the_utterance(tmp_path, case):
    """A .tsv line names a whole 16 kHz file that fairseq reads as it is: a segment cut by
    max_duration, or a file resampled here, would give it other audio than its labels."""
    from pretrain.data.fairseq import export_fairseq

    if case == "segment":
        shards = _wav_shards(tmp_path, 16000, 12.0, "max_duration=5", "long_policy=split")
        said = r"key 'spk/long.*': fairseq's .tsv cannot address this utterance: it is \d+\.\d+-\d+\.\d+ s of spk/long.wav \(split by max_duration\)"
    else:
        shards = _wav_shards(tmp_path, 22050, 2.0)
        said = r"key 'spk/long': fairseq's .tsv cannot address this utterance: its source spk/long.wav is 22050 Hz"
    with pytest.raises(PretrainError, match=said):
        export_fairseq(shards, "km", tmp_path / "fs", "train")
    assert not (tmp_path / "fs").exists()
