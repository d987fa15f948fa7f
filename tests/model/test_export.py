from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from pretrain.cli import main
from pretrain.model.checkpoint import load_model, save_model
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.utils import PretrainError

from tests.model.test_model import model_config

transformers = pytest.importorskip("transformers")

MODES = {
    "group_norm-post_ln": (),
    "layer_norm-pre_ln": ("model.extractor_mode=layer_norm", "model.layer_norm_first=true",
                          "model.normalize_waveform=true"),
}


@pytest.mark.parametrize("arch", ["hubert", "wavlm"])
@pytest.mark.parametrize("mode", MODES)
def test_hf_export_gives_the_same_hidden_states(arch, mode, tmp_path, tiny_corpus, capsys):
    torch.manual_seed(0)
    model = HubertPretrain(model_config("tiny" if arch == "hubert" else "wavlm_tiny", *MODES[mode]),
                           [LabelSpec("km", 100, 50)]).eval()
    if arch == "wavlm":  # untrained gates and buckets are near-neutral: make the bias matter
        with torch.no_grad():
            for layer in model.backbone.encoder.layers:
                layer.attention.gru_rel_pos_const.uniform_(0.5, 2.0)
                layer.attention.gru_rel_pos_linear.weight.normal_(0, 0.5)
            model.backbone.encoder.layers[0].attention.rel_attn_embed.weight.normal_(0, 1.0)
    save_model(tmp_path / "ckpt" / "model.pt", model)
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf_class = transformers.WavLMModel if arch == "wavlm" else transformers.HubertModel
    assert f"wrote a transformers.{hf_class.__name__} in" in capsys.readouterr().out

    hf = hf_class.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "hf")
    record = json.loads((tiny_corpus / "utterances.jsonl").read_text().splitlines()[0])
    speech, _ = sf.read(tiny_corpus / record["audio"], dtype="float32")
    inputs = processor(speech, sampling_rate=16000, return_tensors="pt")
    waveform = torch.from_numpy(speech)[None]
    with torch.no_grad():
        theirs = hf(inputs.input_values, output_hidden_states=True)
        ours, _ = model.backbone.hidden_states(waveform, torch.tensor([len(speech)]))
        assert (ours - theirs.last_hidden_state).abs().max() < 1e-4
        for layer in range(1, model.cfg.encoder_layers + 1):
            hidden, _ = model.backbone.hidden_states(waveform, torch.tensor([len(speech)]), layer=layer)
            assert (hidden - theirs.hidden_states[layer]).abs().max() < 1e-4
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == arch
    assert config["do_stable_layer_norm"] == (mode == "layer_norm-pre_ln")
    assert json.loads((tmp_path / "hf/preprocessor_config.json").read_text())["do_normalize"] == (
        mode == "layer_norm-pre_ln")


def test_data2vec_base_is_transformers_data2vec_audio_base():
    """configs/model/data2vec.yaml on BASE is the published data2vec audio BASE network:
    transformers' default Data2VecAudioConfig, parameter for parameter."""
    from pretrain.model.export import hf_config

    cfg = model_config("base", *_data2vec_network())
    ours = HubertPretrain(cfg, []).backbone.state_dict()
    theirs = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig()).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    exported = hf_config(cfg)
    assert (exported.num_conv_pos_embeddings, exported.conv_pos_kernel_size) == (5, 19)


def _data2vec_network() -> list[str]:
    """configs/model/data2vec.yaml's architecture lines as overrides."""
    import yaml

    model = yaml.safe_load(open("configs/model/data2vec.yaml"))["model"]
    return [f"model.{k}={str(v).lower()}" for k, v in model.items() if k in (
        "extractor_mode", "normalize_waveform", "layer_norm_first", "conv_pos", "conv_pos_depth")]


def test_the_export_names_the_class_it_wrote(tmp_path, capsys):
    save_model(tmp_path / "ckpt" / "model.pt", HubertPretrain(model_config(
        "tiny", "model.conv_pos_depth=3", "model.conv_pos=5", "model.extractor_mode=layer_norm"), []))
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert f"wrote a transformers.Data2VecAudioModel in {tmp_path / 'hf'}" in capsys.readouterr().out
    assert type(transformers.AutoModel.from_pretrained(tmp_path / "hf")).__name__ == "Data2VecAudioModel"


def test_data2vec_networks_that_transformers_cannot_hold_are_refused(tmp_path):
    model = HubertPretrain(model_config("tiny", "model.conv_pos_depth=3", "model.conv_pos=5",
                                        "model.layer_norm_first=true"), [])
    save_model(tmp_path / "ckpt" / "model.pt", model)
    with pytest.raises(PretrainError, match=r"conv_pos_depth=3 .*\.Data2VecAudioModel, which this model does not fit: "
                                            r"model.extractor_mode='group_norm' \(Data2VecAudioModel: 'layer_norm'\), "
                                            r"model.layer_norm_first=True"):
        from pretrain.model.export import export_hf

        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_model_file_round_trip_and_errors(tmp_path):
    model = HubertPretrain(model_config("tiny"), [LabelSpec("a", 10, 100), LabelSpec("b", 20, 50)])
    save_model(tmp_path / "model.pt", model)
    loaded = load_model(tmp_path)
    assert [s.name for s in loaded.labels] == ["a", "b"]
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    with pytest.raises(PretrainError, match="no model file"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(PretrainError, match="not a readable model file"):
        load_model(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(PretrainError, match="not a pretrain model file"):
        load_model(tmp_path / "other.pt")
    assert np.isfinite(loaded.final_proj.weight.detach().numpy()).all()


def test_an_interrupted_export_leaves_no_config_json(tmp_path, monkeypatch):
    """config.json marks an export complete (iterate's done check, transformers' loading);
    transformers writes it before the weights, so an export that dies after the weights but
    before the feature extractor's file used to look finished."""
    from pretrain.model.export import export_hf

    torch.manual_seed(0)
    save_model(tmp_path / "ckpt" / "model.pt", HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)]))

    def crash(self, *args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(transformers.Wav2Vec2FeatureExtractor, "save_pretrained", crash)
        with pytest.raises(OSError, match="No space left"):
            export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors",
                                                              "preprocessor_config.json", "pretrain_export.json"}
    assert not list(tmp_path.glob(".hf.export-tmp"))
    transformers.HubertModel.from_pretrained(tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()  # a model file alone: no run facts
    assert "2 Transformer layers" in card and "`km` (100 classes, 50 Hz)" in card and "optimizer steps" not in card


def test_s3prl_loads_our_export_through_its_transformers_upstream(tmp_path, tiny_corpus):
    """SUPERB's toolkit: its hf_hubert upstream (transformers' HubertModel and feature extractor)
    gives our hidden states from our export."""
    expert = pytest.importorskip("s3prl.upstream.hf_hubert.expert")
    torch.manual_seed(0)
    model = HubertPretrain(model_config("tiny"), [LabelSpec("km", 100, 50)]).eval()
    save_model(tmp_path / "ckpt" / "model.pt", model)
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    upstream = expert.UpstreamExpert(str(tmp_path / "hf")).eval()
    record = json.loads((tiny_corpus / "utterances.jsonl").read_text().splitlines()[0])
    speech, _ = sf.read(tiny_corpus / record["audio"], dtype="float32")
    wave = torch.from_numpy(speech)
    with torch.no_grad():
        theirs = upstream([wave])["hidden_states"]
        for layer in range(1, model.cfg.encoder_layers + 1):
            ours, _ = model.backbone.hidden_states(wave[None], torch.tensor([len(speech)]), layer=layer)
            assert (ours - theirs[layer]).abs().max() < 1e-4
