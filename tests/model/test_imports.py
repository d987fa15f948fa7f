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


def _released_fairseq_checkpoint(path: Path, ours: HubertPretrain, k: int, hostile: bool = False,
                                 embedding_rows: int | None = None) -> None:
    """A checkpoint with the layout fairseq's trainer saves for HuBERT pretraining
    (``Trainer.state_dict``: ``args`` None, ``cfg`` a plain container, ``model``, ``criterion``,
    ``optimizer_history``, ``task_state`` holding the task's label ``Dictionary``, a pickled
    object, ``extra_state`` with the training metrics, ``last_optimizer_state``), and the
    model's pretraining heads ``label_embs_concat`` and ``final_proj``. Written by pickling an
    object of class ``fairseq.data.dictionary.Dictionary`` from a stand-in module, removed
    again before the import: fairseq itself is not installed here, and must not be needed."""
    import collections
    import sys
    import types

    module = types.ModuleType("fairseq.data.dictionary")

    class Dictionary:  # the attributes fairseq's Dictionary.__init__ and Dictionary.load set
        def __init__(self, labels: list[str]):
            self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
            self.symbols = ["<s>", "<pad>", "</s>", "<unk>", *labels]
            self.count = [1] * len(self.symbols)
            self.indices = {s: i for i, s in enumerate(self.symbols)}
            self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
            self.nspecial = 4

        if hostile:
            def __reduce__(self):
                import os
                return (os.system, ("echo pwned > /dev/null",))

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    module.Dictionary = Dictionary
    names = ("fairseq", "fairseq.data", "fairseq.data.dictionary")
    sys.modules.update({"fairseq": types.ModuleType("fairseq"), "fairseq.data": types.ModuleType("fairseq.data"),
                        "fairseq.data.dictionary": module})
    try:
        dictionary = Dictionary([str(i) for i in range(k)])
        cfg = ours.cfg
        model_cfg = {"_name": "hubert", "label_rate": 50, "extractor_mode": "default",
                     "encoder_layers": cfg.encoder_layers, "encoder_embed_dim": cfg.encoder_embed_dim,
                     "encoder_ffn_embed_dim": cfg.encoder_ffn_embed_dim,
                     "encoder_attention_heads": cfg.encoder_attention_heads, "activation_fn": "gelu",
                     "layer_type": "transformer", "dropout": 0.1, "attention_dropout": 0.1,
                     "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.1,
                     "dropout_features": 0.1, "final_dim": cfg.final_dim, "untie_final_proj": False,
                     "layer_norm_first": cfg.layer_norm_first,
                     "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
                     "conv_bias": cfg.conv_bias, "logit_temp": 0.1, "target_glu": False, "feature_grad_mult": 0.1,
                     "mask_length": 10, "mask_prob": 0.8, "conv_pos": cfg.conv_pos,
                     "conv_pos_groups": cfg.conv_pos_groups, "latent_temp": [2.0, 0.5, 0.999995],
                     "skip_masked": False, "skip_nomask": False}
        task_cfg = {"_name": "hubert_pretraining", "data": "/checkpoint/manifests", "fine_tuning": False,
                    "labels": ["km"], "label_dir": "/checkpoint/labels", "label_rate": 50, "sample_rate": 16000,
                    "normalize": False, "enable_padding": False, "max_sample_size": 250000,
                    "min_sample_size": 32000, "single_target": False, "random_crop": True, "pad_audio": False}
        state = {**to_fairseq(ours),
                 "label_embs_concat": torch.randn(embedding_rows or len(dictionary.symbols), cfg.final_dim),
                 "final_proj.weight": torch.randn(cfg.final_dim, cfg.encoder_embed_dim),
                 "final_proj.bias": torch.zeros(cfg.final_dim)}
        meters = collections.OrderedDict(default=[(0, "loss", "AverageMeter",
                                                   {"val": np.float64(6.5), "sum": 650.0, "count": 100, "round": 3})])
        torch.save({
            "args": None,
            "cfg": {"_name": None, "common": {"fp16": True, "log_interval": 200, "seed": 1337},
                    "distributed_training": {"distributed_world_size": 32}, "model": model_cfg, "task": task_cfg,
                    "criterion": {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                                  "loss_weights": [10.0]},
                    "optimization": {"max_update": 400000, "lr": [0.0005]}},
            "model": state,
            "criterion": None,
            "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 400000}],
            "task_state": {"pt_dictionaries": {"km": dictionary}},
            "extra_state": {"metrics": {"train": meters}, "previous_training_time": 1.5e5,
                            "train_iterator": {"epoch": 120, "iterations_in_epoch": 0, "shuffle": True}},
            "last_optimizer_state": {"state": {0: {"step": torch.tensor(400000.0),
                                                   "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                                     "param_groups": [{"lr": 0.0005, "betas": (0.9, 0.98), "params": [0]}]},
        }, path)
    finally:
        for name in names:
            sys.modules.pop(name, None)


def test_a_released_fairseq_hubert_checkpoint_imports_without_running_its_pickles(tiny_corpus, tmp_path, capsys):
    torch.manual_seed(2)
    ours = HubertPretrain(model_config("tiny", "model.dropout=0.0"), [LabelSpec("km", 100, 50)]).eval()
    _released_fairseq_checkpoint(tmp_path / "hubert_base_ls960.pt", ours, k=100)
    assert execute(["import", "fairseq", str(tmp_path / "hubert_base_ls960.pt"), str(tmp_path / "m/model.pt")]) == 0
    out = capsys.readouterr().out
    assert "fairseq label dictionary 'km': 100 labels" in out
    wave = speech(tiny_corpus)
    for a, b in zip(layers(load_model(tmp_path / "m").eval(), wave), layers(ours, wave)):
        assert (a - b).abs().max() < 1e-4

    # The label dictionary and the label embeddings must agree: a mismatch is a damaged file.
    _released_fairseq_checkpoint(tmp_path / "broken.pt", ours, k=100, embedding_rows=90)
    assert execute(["import", "fairseq", str(tmp_path / "broken.pt"), str(tmp_path / "b/model.pt")]) == 1
    err = capsys.readouterr().err
    assert "label_embs_concat has 90 rows, but the label dictionary 'km' has 104 symbols" in err, err
    # A Dictionary whose pickle calls a function (os.system) is refused, and nothing runs.
    _released_fairseq_checkpoint(tmp_path / "hostile.pt", ours, k=100, hostile=True)
    assert execute(["import", "fairseq", str(tmp_path / "hostile.pt"), str(tmp_path / "h/model.pt")]) == 1
    err = capsys.readouterr().err
    assert "names Python objects (posix.system)" in err and "Traceback" not in err, err
    assert not (tmp_path / "h").exists()
