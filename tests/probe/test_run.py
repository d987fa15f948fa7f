"""``pretrain probe`` end to end on the small synthetic shards: every probe, every row, the
files it writes, and the errors a user can run into."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.cli import main
from pretrain.model.checkpoint import save_model
from pretrain.model.hubert import HubertPretrain, LabelSpec

from tests.model.test_model import model_config

pytestmark = pytest.mark.slow
FAST = ["phone.epochs=8", "phone.ctc_epochs=2", "speaker.epochs=60", "pnmi_k=30", "threads=1", "--no-progress"]


@pytest.fixture(scope="module")
def fbank_model(tmp_path_factory):
    torch.manual_seed(0)
    model = HubertPretrain(model_config("tiny", "model.frontend=fbank"), [LabelSpec("km", 100, 50)])
    path = tmp_path_factory.mktemp("fbank_model") / "model.pt"
    save_model(path, model)
    return path


def test_probe_command_writes_json_table_and_plot(fbank_model, small_shards, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(fbank_model), "--eval-shards", str(small_shards),
                 "--out", str(out), *FAST]) == 0
    record = json.loads((out / "probe.json").read_text())
    assert set(record["rows"]) == {"mfcc", "logmel", "model", "untrained"}
    assert set(record["rows"]["model"]["layers"]) == {"1", "2", "weighted"}
    assert record["skipped"] == {} and record["eval"]["speakers"] == 11
    weights = record["rows"]["model"]["layers"]["weighted"]["layer_weights"]
    assert len(weights) == 2 and abs(sum(weights) - 1) < 1e-6
    for row in record["rows"].values():
        for values in row["layers"].values():
            assert 0 <= values["abx_within"] <= 100 and 0 <= values["abx_across"] <= 100
            assert values["abx_triplets_within"] > 0 and values["abx_items"] > 0
            assert 0 <= values["pnmi"] <= 1 and values["per"] >= 0
    # MFCC's frame phone probe is far above always guessing the commonest phone of probe-test.
    from pretrain.probe.data import load_eval_set

    es = load_eval_set(small_shards)
    test_phones = np.concatenate([u.phones for u in es.utterances if u.split == "test"])
    majority = 100 * np.bincount(test_phones).max() / len(test_phones)
    assert record["rows"]["mfcc"]["layers"]["0"]["phone_acc"] > 1.8 * majority
    # The speaker probe tells the 11 synthetic voices apart (chance: 9 %).
    assert max(record["rows"][r]["layers"]["0"]["speaker_acc"] for r in ("mfcc", "logmel")) > 60
    assert record["best"]["model"]["phone_acc"]["layer"] in (1, 2)
    table = (out / "probe.md").read_text()
    assert "| model layer 2 |" in table and "| untrained weighted sum |" in table and "| mfcc |" in table
    assert (out / "probe.png").stat().st_size > 5000
    assert "wrote" in capsys.readouterr().out


def test_layers_and_probes_subsets_and_a_missing_speaker(fbank_model, small_shards, tmp_path):
    no_speaker = tmp_path / "shards"
    shutil.copytree(small_shards, no_speaker)
    # Rewrite one shard without speakers: only the speaker probe (and ABX, which groups by
    # speaker) can no longer run, with the reason given.
    import io
    import tarfile

    name = sorted(no_speaker.glob("shard-*.tar"))[0]
    members = []
    with tarfile.open(name) as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            if info.name.endswith(".json") and not info.name.endswith(".align.json"):
                meta = json.loads(data)
                meta.pop("speaker", None)
                data = json.dumps(meta).encode()
            members.append((info, data))
    with tarfile.open(name, "w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(fbank_model), "--eval-shards", str(no_speaker), "--out", str(out),
                 "--layers", "2", "--probes", "phone,speaker", "baselines=none", *FAST]) == 0
    record = json.loads((out / "probe.json").read_text())
    assert set(record["rows"]) == {"model"} and set(record["rows"]["model"]["layers"]) == {"2"}
    assert "no 'speaker'" in record["skipped"]["speaker"] and "phone_acc" in record["rows"]["model"]["layers"]["2"]
    assert "probe `speaker` skipped" in (out / "probe.md").read_text()


def test_bad_inputs_are_clear_errors(fbank_model, small_shards, tmp_path, capsys):
    def run(*args):
        code = main(["probe", "--eval-shards", str(small_shards), "--out", str(tmp_path / "o"), *args, *FAST])
        return code, capsys.readouterr().err

    code, err = run("--checkpoint", str(tmp_path / "nowhere"))
    assert code == 1 and "does not exist" in err
    code, err = run("--checkpoint", str(fbank_model), "--layers", "3")
    assert code == 1 and "layer 3 is out of range" in err and "2 Transformer layers" in err
    code, err = run("--checkpoint", str(fbank_model), "checkpoint_sha256=" + "0" * 64)
    assert code == 1 and "does not match its expected sha256" in err
    # A checkpoint folder whose model.pt no longer matches its manifest.
    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    shutil.copy(fbank_model, ckpt / "model.pt")
    (ckpt / "manifest.json").write_text(json.dumps({"files": {"model.pt": "f" * 64}}))
    code, err = run("--checkpoint", str(ckpt))
    assert code == 1 and "does not match the sha256 in" in err and "damaged" in err
    code, err = run("--checkpoint", str(fbank_model), "--probes", "abx", "baselines=none", "abx.min_triplets=10000000")
    assert code == 1 and "too few ABX triplets" in err and "at least 10000000 are needed" in err
    code, err = run("baselines=untrained")
    assert code == 2 and "set checkpoint" in err


ASSET = Path(__file__).resolve().parents[1] / "assets" / "small_cpu_step3000.pt"


def test_the_trained_recipe_model_beats_its_untrained_twin_on_the_phone_probe(small_shards, tmp_path):
    """The small-compute recipe's iteration-1 model (tests/assets/README.md says how it was
    made) against the same architecture at random initialization, on speech it never saw."""
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(ASSET), "--eval-shards", str(small_shards), "--out", str(out),
                 "--probes", "phone", "baselines=untrained", "weighted_sum=false", *FAST]) == 0
    best = json.loads((out / "probe.json").read_text())["best"]
    trained, untrained = best["model"], best["untrained"]
    assert trained["phone_acc"]["value"] > untrained["phone_acc"]["value"] + 3, best
    assert trained["per"]["value"] < untrained["per"]["value"] - 3, best


def test_a_libri_light_item_file_drives_abx_and_bad_ones_are_named(small_shards, tmp_path, capsys):
    from pretrain.probe.abx import abx_errors, read_item_file
    from pretrain.probe.data import load_eval_set
    from pretrain.probe.features import mfcc_row, offsets_of
    from tests.probe.test_abx_librilight import write_item_file

    es = load_eval_set(small_shards)
    ids = [u.key.rsplit("/", 1)[-1] for u in es.utterances]
    item = tmp_path / "eval.item"
    write_item_file(item, es, ids)
    # One line for a file the shards do not hold: counted and logged, not an error.
    item.write_text(item.read_text() + "not-here 0.1 0.3 AA B C spk\n")
    out = tmp_path / "probe"
    assert main(["probe", "--eval-shards", str(small_shards), "--out", str(out), "--probes", "abx",
                 "baselines=mfcc", f"abx.item_file={item}", "abx.max_per_group=3", *FAST]) == 0
    record = json.loads((out / "probe.json").read_text())
    stats = record["settings"]["abx"]["items"]
    assert stats["unmatched"] == 1 and stats["lines"] > 500 and stats["speakers"] == 11
    waves = [u.audio for u in es.utterances]
    items, _ = read_item_file(item, [u.key for u in es.utterances], offsets_of(waves), 3, 0)
    direct = abx_errors(mfcc_row(waves).layers[0], items)
    got = record["rows"]["mfcc"]["layers"]["0"]
    assert got["abx_across"] == pytest.approx(direct["abx_across"]) and got["abx_items"] == len(items)

    def run(text):
        bad = tmp_path / "bad.item"
        bad.write_text(text)
        code = main(["probe", "--eval-shards", str(small_shards), "--out", str(tmp_path / "o"), "--probes", "abx",
                     "baselines=mfcc", f"abx.item_file={bad}", *FAST])
        return code, capsys.readouterr().err

    code, err = run("#header\n" + ids[0] + " 0.1 0.3 AA B C\n")
    assert code == 1 and "bad.item:2: expected 7 fields" in err
    code, err = run("#header\nnobody 0.1 0.3 AA B C spk\n")
    assert code == 1 and "none of its 1 items falls on the evaluation set" in err and "nobody" in err
    code, err = run("#header\n" + ids[0] + " 0.1 soon AA B C spk\n")
    assert code == 1 and "bad.item:2: onset and offset must be seconds" in err
    code = main(["probe", "--eval-shards", str(small_shards), "--out", str(tmp_path / "o"),
                 f"abx.item_file={tmp_path / 'missing.item'}", *FAST])
    assert code == 2 and "abx.item_file" in capsys.readouterr().err
