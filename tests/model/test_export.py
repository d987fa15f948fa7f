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


@pytest.mark.parametrize("mode", MODES)
def test_hf_export_gives_the_same_hidden_states(mode, tmp_path, tiny_corpus):
    torch.manual_seed(0)
    model = HubertPretrain(model_config("tiny", *MODES[mode]), [LabelSpec("km", 100, 50)]).eval()
    save_model(tmp_path / "ckpt" / "model.pt", model)
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0

    hf = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
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
    assert config["do_stable_layer_norm"] == (mode == "layer_norm-pre_ln")
    assert json.loads((tmp_path / "hf/preprocessor_config.json").read_text())["do_normalize"] == (
        mode == "layer_norm-pre_ln")


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
