"""The shard format's promise: our shards are WebDataset shards. The ``webdataset`` package's
own reader yields the same samples (keys, fields, bytes) as ours, for FLAC and WAV audio, with
the label sets' sidecars beside the shards and without them."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
import webdataset as wds

from pretrain.config import load_config
from pretrain.config.shards import ShardsBuildConfig
from pretrain.data.shards import build_shards, iter_shard, read_manifest


def _ours(shards):
    return [{k: v for k, v in sample.items() if k != "__url__"}
            for entry in read_manifest(shards)["shards"] for sample in iter_shard(shards / entry["name"])]


def _theirs(shards):
    urls = [str(shards / entry["name"]) for entry in read_manifest(shards)["shards"]]
    # No shuffling, no decoding: the raw bytes of every member, grouped by WebDataset's rule.
    return [{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}
            for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def _compare(shards, audio: str) -> None:
    ours, theirs = _ours(shards), _theirs(shards)
    assert len(ours) == len(theirs) == read_manifest(shards)["totals"]["utterances"]
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        assert audio in a and "json" in a
        for field in a:
            assert a[field] == b[field], (a["__key__"], field)


def test_webdataset_reads_flac_shards_with_label_sidecars_as_we_do(small_shards):
    assert (small_shards / "labels" / "phones50").is_dir()  # the gold label sets beside the shards
    _compare(small_shards, "flac")


def test_webdataset_reads_wav_shards_without_sidecars_as_we_do(tiny_corpus, tmp_path):
    out = tmp_path / "shards"
    build_shards(load_config(ShardsBuildConfig, [], [f"input={tiny_corpus}", f"out={out}", "per_shard=4",
                                                     "audio_format=wav", "jobs=1"]), progress=False, argv=["test"])
    shutil.rmtree(out / "labels", ignore_errors=True)
    _compare(out, "wav")


@pytest.mark.parametrize("member", [b"a.flac", b"dir.v2/a.flac"])
def test_a_dotted_folder_name_groups_the_same_in_both_readers(tmp_path, member):
    """WebDataset keys a sample by the name up to the first dot of the *file* name; a dot in a
    folder name must not split keys differently in our reader."""
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in ((member.decode(), b"audio"), (member.decode().replace(".flac", ".json"), b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_shard(path)]
    theirs = [{k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
              for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    assert ours == theirs
