"""Models from transformers and fairseq into our model file: same hidden states, every
mismatch named; then usable for features and init_from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pretrain.model.checkpoint import load_model, save_model
from pretrain.model.export import hf_config
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.model.imports import to_fairseq
from pretrain.stages import execute
from pretrain.utils import PretrainError

from tests.model.test_model import model_config

transformers = pytest.importorskip("transformers")


def speech(tiny_corpus) -> torch.Tensor:
    record = json.loads((tiny_corpus / "utterances.jsonl").read_text().splitlines()[0])
    audio, _ = sf.read(tiny_corpus / record["audio"], dtype="float32")
    return torch.from_numpy(audio)[None]


def layers(model: HubertPretrain, wave: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.backbone.hidden_states(wave, torch.tensor([wave.shape[1]]), layer=i)[0]
                for i in range(1, model.cfg.encoder_layers + 1)]


HF_CLASSES = {"hubert": "HubertModel", "wavlm": "WavLMModel", "data2vec": "Data2VecAudioModel"}


@pytest.mark.parametrize("arch", HF_CLASSES)
def test_a_transformers_model_imports_with_equal_hidden_states(arch, tiny_corpus, tmp_path):
    torch.manual_seed(0)
    # data2vec: post-LN and 3 positional convolutions of kernel 5 (its network, small)
    network = ("model.conv_pos=5", "model.conv_pos_depth=3") if arch == "data2vec" else ("model.layer_norm_first=true",)
    cfg = model_config("wavlm_tiny" if arch == "wavlm" else "tiny", "model.extractor_mode=layer_norm",
                       "model.normalize_waveform=true", *network)
    hf = getattr(transformers, HF_CLASSES[arch])(hf_config(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path / "hf")
    assert execute(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "m/model.pt")]) == 0
    model = load_model(tmp_path / "m").eval()
    assert model.labels == [] and model.cfg.arch == ("wavlm" if arch == "wavlm" else "hubert")
    assert model.cfg.normalize_waveform and model.cfg.conv_pos_depth == (3 if arch == "data2vec" else 1)
    wave = speech(tiny_corpus)
    normalized = (wave - wave.mean()) / (wave.var(unbiased=False) + 1e-7).sqrt()  # the processor's
    with torch.no_grad():
        theirs = hf(normalized, output_hidden_states=True).hidden_states
    for i, ours in enumerate(layers(model, wave), start=1):
        assert (ours - theirs[i]).abs().max() < 1e-4, i


def test_a_fairseq_checkpoint_imports_and_round_trips(tiny_corpus, tmp_path):
    torch.manual_seed(1)
    ours = HubertPretrain(model_config("tiny", "model.dropout=0.0"), [LabelSpec("km", 100, 50)]).eval()
    state = {**to_fairseq(ours), "final_proj.weight": torch.zeros(32, 64), "label_embs_concat": torch.zeros(100, 32)}
    fields = {"_name": "hubert", **{k: getattr(ours.cfg, k) for k in (
        "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
        "layer_norm_first", "conv_bias", "conv_pos", "conv_pos_groups", "final_dim")}, "extractor_mode": "default"}
    torch.save({"cfg": {"model": fields, "task": {"normalize": False}}, "model": state}, tmp_path / "fs.pt")
    assert execute(["import", "fairseq", str(tmp_path / "fs.pt"), str(tmp_path / "m/model.pt")]) == 0
    imported = load_model(tmp_path / "m").eval()
    wave = speech(tiny_corpus)
    for a, b in zip(layers(imported, wave), layers(ours, wave)):
        assert (a - b).abs().max() < 1e-4
    # Round trip: our export to transformers imports back to the same layers.
    save_model(tmp_path / "ours/model.pt", ours)
    assert execute(["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert execute(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back/model.pt")]) == 0
    for a, b in zip(layers(load_model(tmp_path / "back").eval(), wave), layers(ours, wave)):
        assert (a - b).abs().max() < 1e-4
    # Labels from a released model's layer: `features model` reads the imported file.
    from pretrain.features.extract import Extractor, FeatureSpec

    feats = Extractor(FeatureSpec.model(str(tmp_path / "m"), 2), "cpu")([wave[0].numpy()])[0]
    assert np.allclose(feats, layers(ours, wave)[1][0].numpy(), atol=1e-4)
    # An imported backbone has no pretraining loss; it starts a new run through init_from.
    from pretrain.train.loop import init_backbone

    fresh = HubertPretrain(model_config("tiny"), [LabelSpec("new", 50, 50)])
    init_backbone(fresh, str(tmp_path / "m"))
    for a, b in zip(layers(fresh.eval(), wave), layers(ours, wave)):
        assert (a - b).abs().max() < 1e-4


def test_foreign_and_damaged_sources_are_named(tmp_path):
    from pretrain.model.imports import import_fairseq, import_hf

    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(PretrainError, match=r"holds a transformers 'bert' model \(BertModel\)"):
        import_hf(tmp_path / "bert")
    ours = HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)])
    state = to_fairseq(ours)
    state.pop("encoder.layers.1.fc2.bias")
    state["encoder.layers.0.adapter.weight"] = torch.zeros(2)
    fields = {k: getattr(ours.cfg, k) for k in ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                                                "encoder_attention_heads", "conv_pos", "conv_pos_groups")}
    torch.save({"cfg": {"model": fields}, "model": state}, tmp_path / "odd.pt")
    with pytest.raises(PretrainError, match=r"parameters pretrain does not know: \['encoder.layers.0.adapter.weight'\]"):
        import_fairseq(tmp_path / "odd.pt")
    del state["encoder.layers.0.adapter.weight"]
    torch.save({"cfg": {"model": fields}, "model": state}, tmp_path / "short.pt")
    with pytest.raises(PretrainError, match=r"missing \['encoder.layers.1.feed_forward.output_dense.bias'\]"):
        import_fairseq(tmp_path / "short.pt")
    torch.save({"cfg": {"model": fields}, "model": state, "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(PretrainError, match=r"names Python objects \(builtins.print\)"):
        import_fairseq(tmp_path / "evil.pt")


def test_a_weights_file_missing_a_layer_is_refused_not_filled_at_random(tmp_path, capsys):
    """transformers fills weights a file lacks with random ones: the import reads what the file
    itself held and refuses the gap, naming the parameters (it used to write a model whose
    layer 1 was random)."""
    from safetensors.torch import load_file, save_file

    cfg = model_config("tiny", "model.extractor_mode=layer_norm", "model.layer_norm_first=true")
    transformers.HubertModel(hf_config(cfg)).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf/model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("encoder.layers.1.")}, weights,
              metadata={"format": "pt"})
    assert execute(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "m/model.pt")]) == 1
    err = capsys.readouterr().err
    assert "the weights file has" in err and "missing parameters for a HubertModel: encoder.layers.1." in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_an_import_never_replaces_a_model_unasked(tmp_path, capsys):
    cfg = model_config("tiny", "model.extractor_mode=layer_norm", "model.layer_norm_first=true")
    transformers.HubertModel(hf_config(cfg)).save_pretrained(tmp_path / "hf")
    step = tmp_path / "checkpoints/step_4"
    step.mkdir(parents=True)
    (step / "model.pt").write_bytes(b"trained")
    (step / "manifest.json").write_text("{}")
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"mine")
    for out, said in ((step / "model.pt", "is a checkpoint folder"),
                      (mine, "already exists with other content; set overwrite=true"),
                      (tmp_path, "is a folder; name the model file")):
        assert execute(["import", "hf", str(tmp_path / "hf"), str(out)]) == 1
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert (step / "model.pt").read_bytes() == b"trained" and mine.read_bytes() == b"mine"
    assert execute(["import", "hf", str(tmp_path / "hf"), str(mine), "overwrite=true"]) == 0
    imported = mine.read_bytes()
    assert imported != b"mine"
    capsys.readouterr()
    # A rerun finds this very model there: no error, nothing written.
    assert execute(["import", "hf", str(tmp_path / "hf"), str(mine)]) == 0
    assert "already holds this model" in capsys.readouterr().out and mine.read_bytes() == imported


def test_fairseq_sources_that_are_no_checkpoint_are_one_line_and_a_legacy_one_imports(tmp_path, capsys):
    import pickle

    ours = HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)])
    fields = {k: getattr(ours.cfg, k) for k in ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                                                "encoder_attention_heads", "conv_pos", "conv_pos_groups")}
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "bare.pt").write_bytes(pickle.dumps({"cfg": {"model": fields}}))
    for name, said in (("empty.pt", "an empty file"), ("random.pt", "is not"), ("bare.pt", "is not")):
        assert execute(["import", "fairseq", str(tmp_path / name), str(tmp_path / f"{name}.out")]) == 1
        err = capsys.readouterr().err
        assert f"{tmp_path / name}" in err and said in err and "Traceback" not in err, err
    # torch's legacy (pre-zip) serialization: weights_only reads it, so it imports.
    torch.save({"cfg": {"model": fields}, "model": to_fairseq(ours)}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    assert execute(["import", "fairseq", str(tmp_path / "legacy.pt"), str(tmp_path / "m.pt")]) == 0
    assert load_model(tmp_path / "m.pt").cfg.encoder_layers == ours.cfg.encoder_layers
    # ... and code in one is refused there too, never run.
    torch.save({"cfg": {"model": fields}, "model": to_fairseq(ours), "hook": print}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=False)
    assert execute(["import", "fairseq", str(tmp_path / "evil.pt"), str(tmp_path / "e.pt")]) == 1
    assert "names Python objects beyond tensors" in capsys.readouterr().err


def test_damaged_transformers_folders_are_one_line_naming_the_file(tmp_path, capsys):
    cfg = model_config("tiny", "model.extractor_mode=layer_norm", "model.layer_norm_first=true")
    good = tmp_path / "hf"
    transformers.HubertModel(hf_config(cfg)).save_pretrained(good)
    config = json.loads((good / "config.json").read_text())

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    cases = [
        (variant("truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000])),
         "could not read the weights"),
        (variant("fields", lambda f: (f / "config.json").write_text(json.dumps(
            {k: v for k, v in config.items() if k not in ("hidden_size", "num_hidden_layers")}))),
         "config.json: no num_hidden_layers, hidden_size"),
        (variant("json", lambda f: (f / "config.json").write_text("{not json")), "config.json: not valid JSON"),
        (variant("noweights", lambda f: (f / "model.safetensors").unlink()), "has a config.json but no weights file"),
    ]
    for folder, said in cases:
        assert execute(["import", "hf", str(folder), str(tmp_path / f"{folder.name}.pt")]) == 1
        err = capsys.readouterr().err
        assert str(folder) in err and said in err and "Traceback" not in err, err
        assert not (tmp_path / f"{folder.name}.pt").exists()
