"""kNN-VC: the matching, the vocoder-free audio, the probe inside ``pretrain probe`` and the
``pretrain knnvc`` command, on the synthetic speech."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from pretrain.cli import main
from pretrain.probe.data import load_eval_set
from pretrain.probe.features import mfcc_frames
from pretrain.probe.knnvc import Reference, convert, knn, overlap_add, smoothness, unit

from tests.probe.test_run import FAST, fbank_model  # noqa: F401  (a fixture)

assert fbank_model  # used as a fixture below


def test_knn_equals_brute_force_cosine_neighbours():
    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(500, 24)) * rng.uniform(0.1, 5, size=(500, 1)), rng.normal(size=(60, 24))
    idx = knn(query, ref, 4, device="cpu")
    sims = unit(query) @ unit(ref).T
    expected = np.argsort(-sims, axis=1)[:, :4]
    np.testing.assert_array_equal(idx, expected)
    with pytest.raises(ValueError, match="needs at least as many"):
        knn(query, ref[:3], 4)


@pytest.mark.gpu
def test_knn_on_the_gpu_equals_the_cpu():
    rng = np.random.default_rng(1)
    ref, query = rng.normal(size=(20000, 256)).astype(np.float32), rng.normal(size=(3000, 256)).astype(np.float32)
    gpu, cpu = knn(query, ref, 4, device="cuda"), knn(query, ref, 4, device="cpu")
    assert np.mean(gpu == cpu) > 0.999  # float32 sums in another order may swap near-ties


def test_an_utterance_converted_to_itself_comes_back(small_shards):
    """With the reference made of the source utterance itself and k = 1, every frame matches
    itself: content and smoothness are 100 % and the overlap-add rebuilds the waveform."""
    es = load_eval_set(small_shards)
    u = es.utterances[0]
    feats = mfcc_frames([u.audio])[0]
    ref = Reference.build([feats], [u.audio], [u.phones])
    conv = convert(feats, ref, 1, device="cpu")
    assert np.all(conv.idx[:, 0] == np.arange(len(feats)))
    assert smoothness(conv.idx, ref) == 1.0
    assert np.all(ref.phones[conv.idx[:, 0]] == u.phones)
    for window in (640, 960, 1280):
        wave = overlap_add(ref, conv.idx, len(u.audio), window)
        # Every sample the frames cover (from the first centre less half a window) comes back.
        lo, hi = 200 + window // 2, 200 + 320 * (len(feats) - 1) - window // 2
        err = wave[lo:hi] - u.audio[lo:hi]
        snr = 10 * np.log10(np.sum(u.audio[lo:hi] ** 2) / max(np.sum(err ** 2), 1e-20))
        assert snr > 60, (window, snr)
    # A reference of another voice: the audio is that voice's frames, not the source's.
    other = next(v for v in es.utterances if v.speaker != u.speaker)
    ref2 = Reference.build([mfcc_frames([other.audio])[0]], [other.audio])
    conv2 = convert(feats, ref2, 4, device="cpu")
    wave2 = overlap_add(ref2, conv2.idx, len(u.audio))
    assert len(wave2) == len(u.audio) and np.abs(wave2).max() <= np.abs(other.audio).max() + 1e-6
    assert 0 <= smoothness(conv2.idx, ref2) < 0.9


@pytest.mark.slow
def test_the_knnvc_probe_joins_probe_json_and_the_table(fbank_model, small_shards, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", str(fbank_model), "--eval-shards", str(small_shards), "--out", str(out),
                 "--probes", "knnvc", "baselines=mfcc,untrained", "knnvc.max_pairs=3", *FAST]) == 0
    record = json.loads((out / "probe.json").read_text())
    assert set(record["probes"]) == {"knnvc", "phone", "speaker"}  # its figures are those probes' decisions
    for name in ("model", "untrained", "mfcc"):
        for layer, values in record["rows"][name]["layers"].items():
            if layer == "weighted":
                assert "knnvc_content" not in values
                continue
            assert values["knnvc_pairs"] == 3
            for metric in ("knnvc_content", "knnvc_phone_acc", "knnvc_target", "knnvc_source", "knnvc_target_audio",
                           "knnvc_source_audio", "knnvc_smooth"):
                assert 0 <= values[metric] <= 100, (name, layer, metric)
            assert values["knnvc_seconds_per_source_minute"] > 0
    # MFCC matches carry the phone far above chance (46 phones).
    assert record["rows"]["mfcc"]["layers"]["0"]["knnvc_content"] > 20
    assert "kNN-VC same phone (%)" in (out / "probe.md").read_text()
    assert record["best"]["model"]["knnvc_content"]["layer"] in (1, 2)
    assert record["seconds"]["knnvc"] > 0


@pytest.mark.slow
def test_the_knnvc_command_writes_audio_pictures_and_metrics(fbank_model, small_shards, tmp_path, capsys):
    es = load_eval_set(small_shards)
    source, target = es.speakers[0], es.speakers[1]
    out = tmp_path / "vc"
    assert main(["knnvc", "--checkpoint", str(fbank_model), "--shards", str(small_shards), "--source", source,
                 "--target", target, "--out", str(out), "--layer", "2", "threads=1"]) == 0
    record = json.loads((out / "knnvc.json").read_text())
    n = len([u for u in es.utterances if u.speaker == source][:3])
    assert len(record["utterances"]) == n and record["layer"] == 2
    for i, entry in enumerate(record["utterances"]):
        audio, sr = sf.read(out / entry["wav"])
        src = next(u for u in es.utterances if u.key == entry["key"])
        assert sr == 16000 and len(audio) == len(src.audio) and np.abs(audio).max() > 0.01
        assert 0 <= entry["content"] <= 100 and -1 <= entry["reencoded_cosine"] <= 1
        assert (out / f"source_{i}.wav").is_file()
    assert (out / "spectrograms.png").stat().st_size > 20000
    assert record["seconds_per_source_minute"]["match"] > 0 and (out / "run.json").is_file()
    assert "cost per minute of source audio" in capsys.readouterr().out
    # The baseline needs no model.
    assert main(["knnvc", "--shards", str(small_shards), "--source", source, "--target", target,
                 "--out", str(tmp_path / "mfcc"), "features=mfcc", "max_sources=1"]) == 0

    def err(*args):
        code = main(["knnvc", "--shards", str(small_shards), "--out", str(tmp_path / "e"), *args])
        return code, capsys.readouterr().err

    code, msg = err("--checkpoint", str(fbank_model), "--source", "nobody", "--target", target, "--layer", "1")
    assert code == 1 and "source speaker 'nobody' is not in" in msg and target in msg
    code, msg = err("--checkpoint", str(fbank_model), "--source", source, "--target", target, "--layer", "3")
    assert code == 1 and "layer 3 is out of range" in msg
    # The default, the paper's layer 6, falls back to a 2-layer model's last, with a warning.
    assert main(["knnvc", "--checkpoint", str(fbank_model), "--shards", str(small_shards), "--source", source,
                 "--target", target, "--out", str(tmp_path / "default"), "max_sources=1"]) == 0
    record = json.loads((tmp_path / "default" / "knnvc.json").read_text())
    assert record["layer"] == 2 and "layer 6 (the paper's) is beyond" in record["layer_note"]
    capsys.readouterr()
    code, msg = err("--checkpoint", str(fbank_model), "--source", source, "--target", source)
    assert code == 2 and "same speaker" in msg
    code, msg = err("--source", source, "--target", target)
    assert code == 2 and "set checkpoint" in msg
    code, msg = err("--checkpoint", str(fbank_model), "--source", source, "--target", target, "--layer", "1",
                    "source_keys=[not/a-key]")
    assert code == 1 and "source key 'not/a-key'" in msg


@pytest.mark.slow
def test_knnvc_reads_a_transformers_folder_like_our_model_file(small_shards, tmp_path):
    """Our export of a conv-front-end HuBERT in transformers' HubertModel gives the same
    conversion as the model file it came from (hidden states agree within 1e-4)."""
    import torch

    from pretrain.model.checkpoint import save_model
    from pretrain.model.hubert import HubertPretrain, LabelSpec
    from tests.model.test_model import model_config

    pytest.importorskip("transformers")
    torch.manual_seed(0)
    save_model(tmp_path / "ckpt" / "model.pt", HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)]))
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    es = load_eval_set(small_shards)
    records = {}
    for name, checkpoint in (("ours", tmp_path / "ckpt" / "model.pt"), ("hf", tmp_path / "hf")):
        assert main(["knnvc", "--checkpoint", str(checkpoint), "--shards", str(small_shards), "--source",
                     es.speakers[2], "--target", es.speakers[3], "--out", str(tmp_path / name), "--layer", "2",
                     "max_sources=2", "threads=1"]) == 0
        records[name] = json.loads((tmp_path / name / "knnvc.json").read_text())
    assert records["hf"]["what"].startswith("hf hubert") and records["ours"]["what"].startswith("pretrain hubert")
    for a, b in zip(records["ours"]["utterances"], records["hf"]["utterances"]):
        assert a["key"] == b["key"] and abs(a["content"] - b["content"]) < 1 and abs(a["smoothness"] - b["smoothness"]) < 1
