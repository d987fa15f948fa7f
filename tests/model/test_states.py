"""LayerStates, the one reader of a model's layer states: ours and transformers folders agree,
every layer from one forward equals that layer alone, long audio in windows matches one forward,
layer numbers are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.cli import main
from pretrain.model.checkpoint import save_model
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.model.states import LayerStates
from pretrain.probe.data import load_eval_set
from pretrain.utils import PretrainError

from tests.model.test_model import model_config


def _model(tmp_path, *overrides: str):
    torch.manual_seed(1)
    model = HubertPretrain(model_config("tiny", *overrides), [LabelSpec("km", 100, 50)])
    save_model(tmp_path / "ours" / "model.pt", model)
    return model


@pytest.mark.parametrize("network", [(), ("model.conv_pos=5", "model.conv_pos_depth=3")], ids=["hubert", "data2vec"])
def test_a_transformers_folder_gives_the_same_layers_as_our_model(network, small_shards, tmp_path):
    """HubertModel, and Data2VecAudioModel for data2vec's positional convolutions."""
    pytest.importorskip("transformers")
    _model(tmp_path, "model.extractor_mode=layer_norm", "model.normalize_waveform=true", *network)
    assert main(["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    waves = [u.audio for u in load_eval_set(small_shards).utterances[:3]]
    ours = LayerStates(tmp_path / "ours")(waves, [1, 2])
    theirs = LayerStates(tmp_path / "hf")
    assert theirs.kind == "hf" and theirs.num_layers == 2 and theirs.normalize
    assert type(theirs.model).__name__ == ("Data2VecAudioModel" if network else "HubertModel")
    for layer, states in theirs(waves, [1, 2]).items():
        for x, y in zip(states, ours[layer]):
            assert x.shape == y.shape
            assert np.abs(x - y).max() < 1e-4


def test_every_layer_from_one_forward_is_that_layer_alone(small_shards, tmp_path):
    model = _model(tmp_path, "model.extractor_mode=layer_norm").eval()
    waves = [u.audio for u in load_eval_set(small_shards).utterances[:3]]
    # One utterance per forward: a padded batch changes the matmuls' shapes, so the last bits.
    states = LayerStates(tmp_path / "ours", batch_samples=0)(waves, [0, 1, 2])
    for i, wave in enumerate(waves):
        audio, lengths = torch.from_numpy(wave)[None], torch.tensor([len(wave)])
        with torch.no_grad():
            assert np.array_equal(states[0][i], model.backbone.features(audio, lengths)[0].numpy())
        for layer in (1, 2):
            alone, _ = model.backbone.hidden_states(audio, lengths, layer=layer)
            assert np.array_equal(states[layer][i], alone[0].numpy())


def test_layers_that_do_not_exist_are_refused_by_name(small_shards, tmp_path):
    _model(tmp_path)
    waves = [load_eval_set(small_shards).utterances[0].audio]
    with pytest.raises(PretrainError, match=r"layer 3 does not exist: .*model.pt has 2"):
        LayerStates(tmp_path / "ours")(waves, [3])


@pytest.mark.slow
def test_a_transformers_group_norm_model_in_windows_matches_one_forward(small_shards, tmp_path):
    """The utterance-wide GroupNorm statistics are hooked into transformers' own first conv
    layer, as into ours (tests/features/test_extract.py): only attention beyond the context
    differs."""
    pytest.importorskip("transformers")
    _model(tmp_path, "model.extractor_mode=group_norm", "model.normalize_waveform=true")
    assert main(["export", "hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    long = np.concatenate([u.audio for u in load_eval_set(small_shards).utterances])[:12 * 16000]
    whole = LayerStates(tmp_path / "hf", chunk_seconds=1000.0)([long], [2])[2][0]
    windowed = LayerStates(tmp_path / "hf", chunk_seconds=5.0, chunk_context=3.0)([long], [2])[2][0]
    assert windowed.shape == whole.shape
    assert np.abs(windowed - whole).max() < 0.005 * np.abs(whole).max()
    bare = LayerStates(tmp_path / "hf", chunk_seconds=5.0, chunk_context=0.0)([long], [2])[2][0]
    assert np.abs(bare - whole).max() > 0.05 * np.abs(whole).max()


@pytest.mark.gpu
def test_gpu_features_under_bf16_autocast_match_the_cpu(small_shards, tmp_path):
    _model(tmp_path, "model.frontend=fbank")
    fbank_model = tmp_path / "ours" / "model.pt"
    waves = [u.audio for u in load_eval_set(small_shards).utterances[:4]]
    cpu = LayerStates(fbank_model, "cpu")(waves, [1, 2])
    gpu = LayerStates(fbank_model, "cuda")(waves, [1, 2])
    for layer in (1, 2):
        for g, c in zip(gpu[layer], cpu[layer]):
            assert g.dtype == np.float32 and g.shape == c.shape
            # bf16 keeps 8 bits of mantissa: compare relative to the features' scale.
            assert np.abs(g - c).max() < 0.05 * np.abs(c).max()
