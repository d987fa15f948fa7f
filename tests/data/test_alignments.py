"""External phone alignments (MFA TextGrids, per-frame files) into reference label sets: the
synthetic corpus's own alignments, written out as TextGrids with aligner symbols, come back as
the same frame labels; broken alignments are named."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from pretrain.phones import PHONES
from pretrain.data.alignments import import_alignments
from pretrain.data.labels import LabelSet
from pretrain.data.shards import iter_shard, read_manifest
from pretrain.stages import execute
from pretrain.utils import PretrainError

textgrid = pytest.importorskip("praatio.textgrid")


def aligner(phone: str) -> str:
    return phone.upper() + ("1" if phone[0] in "aeiou" else "")  # ARPAbet with stress, as MFA writes it


@pytest.fixture()
def tree(small_shards, tmp_path):
    """The shards (copied), their alignments as MFA-style TextGrids and a phone map."""
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    grids = tmp_path / "mfa"
    for entry in read_manifest(shards)["shards"]:
        for sample in iter_shard(shards / entry["name"]):
            align = json.loads(sample["align.json"])
            sr, end = align["sample_rate"], align["num_samples"] / align["sample_rate"]
            spoken = [(s / sr, e / sr, aligner(p)) for p, s, e in align["segments"] if p != "sil"]
            grid = textgrid.Textgrid()
            grid.addTier(textgrid.IntervalTier("phones", spoken, 0, end))
            path = grids / f"{sample['__key__']}.TextGrid"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(str(path), format="long_textgrid", includeBlankSpaces=True)
    phone_map = tmp_path / "map.txt"
    phone_map.write_text("# MFA symbol -> phone\nsp sil\nspn sil\n" +
                         "".join(f"{aligner(p)} {p}\n" for p in PHONES if p != "sil"))
    return shards, grids, phone_map


def by_name(shards, name) -> dict[str, list[str]]:
    labels = LabelSet(shards, name)
    names = labels.meta["provenance"].get("phones") or list(PHONES)
    return {k: [names[i] for i in v] for s in read_manifest(shards)["shards"]
            for k, v in labels.load_shard(s["name"]).items()}


def test_textgrids_give_the_corpus_own_frame_labels(tree):
    shards, grids, phone_map = tree
    assert execute(["labels", "alignments", "--shards", str(shards), "--phone-map", str(phone_map), "--textgrids",
                    str(grids), "prefix=mfa"]) == 0
    for rate in (50, 100):
        theirs, ours = by_name(shards, f"mfa{rate}"), by_name(shards, f"phones{rate}")
        assert theirs == ours, rate
    assert LabelSet(shards, "mfa50").meta["provenance"]["phones"][0] == "sil"


def test_frame_files_and_broken_alignments(tree, tmp_path):
    shards, grids, phone_map = tree
    # Per-frame phones at 100 Hz, from the corpus's own labels.
    ours = by_name(shards, "phones100")
    frames = tmp_path / "frames.txt"
    frames.write_text("".join(f"{k} {' '.join(aligner(p) if p != 'sil' else 'sp' for p in v)}\n" for k, v in ours.items()))
    import_alignments(shards, phone_map, frames=frames, prefix="kaldi")
    assert by_name(shards, "kaldi100") == ours
    agree = np.mean([a == b for k, v in by_name(shards, "kaldi50").items()
                     for a, b in zip(v, by_name(shards, "phones50")[k])])
    assert agree > 0.95  # 50 Hz from 10 ms frames: only boundary frames may differ

    key = sorted(ours)[0]
    short = tmp_path / "short.txt"
    short.write_text("".join(f"{k} {' '.join(['sp'] * (len(v) // 2))}\n" for k, v in ours.items()))
    with pytest.raises(PretrainError, match=r"short.txt: key '.*' has \d+ frames, but its \d+ samples give \d+ at 100 Hz"):
        import_alignments(shards, phone_map, frames=short, prefix="short")
    path = grids / f"{key}.TextGrid"
    grid = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    entries = grid.getTier("phones").entries
    # A phone the map does not name: the file, the time and the phone.
    broken = textgrid.Textgrid()
    first = entries[0]
    broken.addTier(textgrid.IntervalTier("phones", [(first.start, first.end, "ZZ9"), *entries[1:]], 0, grid.maxTimestamp))
    broken.save(str(path), format="long_textgrid", includeBlankSpaces=True)
    with pytest.raises(PretrainError, match=rf"{path}: phone 'ZZ9' at {first.start:.3f} s is not in the phone map"):
        import_alignments(shards, phone_map, textgrids=grids, prefix="broken")
    # A gap (a hand-edited file, another aligner): the file and where.
    gap = textgrid.Textgrid()
    gap.addTier(textgrid.IntervalTier("phones", entries, 0, grid.maxTimestamp))
    gap.save(str(path), format="long_textgrid", includeBlankSpaces=False)
    with pytest.raises(PretrainError, match=rf"{path}: tier 'phones' has a gap from "):
        import_alignments(shards, phone_map, textgrids=grids, prefix="broken")
    path.unlink()
    with pytest.raises(PretrainError, match=rf"1 of the 40 utterances of .* have no alignment \(first: '{key}'"):
        import_alignments(shards, phone_map, textgrids=grids, prefix="broken")



def test_a_frame_file_with_a_key_twice_or_foreign_keys_or_bad_bytes_is_refused(tree, tmp_path, capsys):
    shards, _, phone_map = tree
    ours = by_name(shards, "phones100")
    lines = [f"{k} {' '.join(aligner(p) if p != 'sil' else 'sp' for p in v)}\n" for k, v in ours.items()]
    frames = tmp_path / "frames.txt"
    # The same key twice (the last line used to win, silently).
    frames.write_text("".join(lines) + lines[3])
    key = lines[3].split()[0]
    with pytest.raises(PretrainError, match=rf"frames.txt:{len(lines) + 1}: key '{re.escape(key)}' again \(first on "
                                            r"line 4\)"):
        import_alignments(shards, phone_map, frames=frames, prefix="x")
    # Keys that are no utterance of the shards (used to be ignored without a word).
    frames.write_text("".join(lines) + "other/corpus_1 sp sp\nother/corpus_2 sp\n")
    with pytest.raises(PretrainError, match=r"frames.txt: 2 keys are not utterances of .* \(first: 'other/corpus_1'\)"):
        import_alignments(shards, phone_map, frames=frames, prefix="x")
    # Not text, and a folder: one line naming the file, through the real command.
    frames.write_bytes(b"\xff\xfe" + "".join(lines).encode())
    for path, said in ((frames, "not UTF-8 text"), (tmp_path, "a folder, where a frame alignment file is expected")):
        assert execute(["labels", "alignments", "--shards", str(shards), "--phone-map", str(phone_map),
                        "--frames", str(path), "prefix=x"]) == 1
        err = capsys.readouterr().err
        assert f"{path}: {said}" in err and "Traceback" not in err


def tree_bytes(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_label_sets_and_exported_files_are_never_replaced_unasked(tree, tmp_path, capsys):
    """The synthetic corpus's gold phones50/phones100, another run's label set, a user's
    train.tsv: each refused naming what exists and the flag, and left as it was; a rerun that
    would write exactly what is there is no error and touches nothing."""
    shards, grids, phone_map = tree
    before = tree_bytes(shards)
    args = ["labels", "alignments", "--shards", str(shards), "--phone-map", str(phone_map), "--textgrids", str(grids)]
    # These TextGrids hold the corpus's own alignments: the gold sets already hold exactly these labels.
    assert execute(args) == 0
    assert "already hold exactly these labels: nothing written" in capsys.readouterr().out
    assert tree_bytes(shards) == before
    # Another phone map (every phone but silence collapsed into one) makes other labels.
    coarse = tmp_path / "coarse.txt"
    coarse.write_text("sp sil\nspn sil\n" + "".join(f"{aligner(p)} speech\n" for p in PHONES if p != "sil"))
    coarse_args = ["labels", "alignments", "--shards", str(shards), "--phone-map", str(coarse), "--textgrids", str(grids)]
    assert execute(coarse_args) == 1
    err = capsys.readouterr().err
    assert "label sets" in err and "phones50, " in err and "with other labels; set overwrite=true to replace them" in err
    assert tree_bytes(shards) == before
    assert execute([*coarse_args, "overwrite=true"]) == 0
    assert LabelSet(shards, "phones50").num_classes == 2
    capsys.readouterr()
    out = tmp_path / "fs"
    out.mkdir()
    (out / "train.tsv").write_text("mine\n")
    export = ["labels", "export", "--shards", str(shards), "--name", "phones50", "--out", str(out), "split=train"]
    assert execute(export) == 1
    assert "train.tsv already exists with other content; set overwrite=true" in capsys.readouterr().err
    assert (out / "train.tsv").read_text() == "mine\n" and not (out / "train.km").exists()
    assert execute([*export, "overwrite=true"]) == 0
    exported = tree_bytes(out)
    capsys.readouterr()
    assert execute(export) == 0 and tree_bytes(out) == exported
    assert "already hold exactly these labels: nothing written" in capsys.readouterr().out
    # labels import over an existing set (it used to replace phones50 with 100 Hz labels).
    assert execute(["labels", "export", "--shards", str(shards), "--name", "phones100", "--out", str(out)]) == 0
    before = tree_bytes(shards)
    assert execute(["labels", "import", "--shards", str(shards), "--tsv", str(out / "phones100.tsv"), "--km",
                    str(out / "phones100.km"), "--name", "phones50", "--rate", "100"]) == 1
    assert "phones50 already exists with other labels; set overwrite=true to replace it" in capsys.readouterr().err
    assert tree_bytes(shards) == before
    # The same .tsv/.km at the set's own rate: what is there already.
    assert execute(["labels", "import", "--shards", str(shards), "--tsv", str(out / "train.tsv"), "--km",
                    str(out / "train.km"), "--name", "phones50", "--rate", "50"]) == 0
    assert "nothing written" in capsys.readouterr().out and tree_bytes(shards) == before
