"""fairseq's .tsv + .km label files to and from keyed label sets."""

from __future__ import annotations

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
