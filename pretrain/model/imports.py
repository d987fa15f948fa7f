"""Models from elsewhere into our model file: ``pretrain import hf DIR`` (a transformers
HubertModel, WavLMModel, Data2VecAudioModel or Wav2Vec2Model folder) and ``pretrain import
fairseq CKPT`` (a fairseq HuBERT checkpoint's model state).

What is imported is the backbone (waveform encoder, projection, Transformer, mask embedding):
the model file gets no label sets. The exception is a ``Wav2Vec2ForPreTraining`` folder, whose
quantizer and projections come along (a wav2vec 2.0 model file: they are what its training
continues with, and they belong to no clustering). That is what the two uses need: ``features model`` on one of
its layers (labels for a first iteration from a released model), and ``pretrain train
init_from=MODEL`` (continued pretraining on new data), which starts the label embeddings and
``final_proj`` fresh for the new label set in any case: the old ones belong to another k and
another clustering.

Our backbone's parameter names are transformers' (export loads them strictly), so the
transformers import is a strict ``load_state_dict``; fairseq's names are mapped (``FAIRSEQ``
rules). Either way every missing or unexpected parameter is listed in the error.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from pretrain.config.model import ModelConfig
from pretrain.frames import CONV_LAYERS
from pretrain.model.encoder import CONV_CHANNELS
from pretrain.model.hubert import HubertPretrain
from pretrain.model.wav2vec2 import Wav2Vec2Pretrain
from pretrain.utils import PretrainError

# fairseq name -> ours (regular expressions on the whole key; the first match wins).
FAIRSEQ = [
    (r"mask_emb", r"masked_spec_embed"),
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.weight_g", r"encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.weight_v", r"encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]
FAIRSEQ_HEADS = ("final_proj.weight", "final_proj.bias", "label_embs_concat")
"""The pretraining heads, left behind (see the module docstring)."""

# fairseq HubertConfig field -> ModelConfig field
_FAIRSEQ_FIELDS = {"encoder_layers": "encoder_layers", "encoder_embed_dim": "encoder_embed_dim",
                   "encoder_ffn_embed_dim": "encoder_ffn_embed_dim",
                   "encoder_attention_heads": "encoder_attention_heads", "layer_norm_first": "layer_norm_first",
                   "conv_bias": "conv_bias", "conv_pos": "conv_pos", "conv_pos_groups": "conv_pos_groups",
                   "dropout": "dropout", "attention_dropout": "attention_dropout",
                   "activation_dropout": "activation_dropout", "encoder_layerdrop": "encoder_layerdrop",
                   "dropout_input": "dropout_input", "dropout_features": "dropout_features",
                   "feature_grad_mult": "feature_grad_mult", "final_dim": "final_dim",
                   "mask_prob": "mask_prob", "mask_length": "mask_length"}


def _backbone_model(cfg: ModelConfig) -> HubertPretrain:
    return HubertPretrain(cfg, [])


def _load_strict(model: HubertPretrain, state: dict, source: str) -> None:
    mine = model.backbone.state_dict()
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    misfit = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(mine[k].shape)}" for k in set(mine) & set(state)
                    if state[k].shape != mine[k].shape)
    if missing or unexpected or misfit:
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 f"of another shape {misfit}" if misfit else ""]
        raise PretrainError(f"{source}: parameters do not fit the model its config describes: "
                            + "; ".join(p for p in parts if p))
    model.backbone.load_state_dict(state, strict=True)


def import_hf(folder: str | Path) -> HubertPretrain:
    """The backbone of a transformers HubertModel / WavLMModel / Data2VecAudioModel /
    Wav2Vec2Model folder; of a Wav2Vec2ForPreTraining folder, the whole wav2vec 2.0 model (its
    quantizer and projections too), so that training can continue from it."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise PretrainError(f"{folder} has no config.json: not a transformers model folder")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PretrainError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PretrainError(f"{path}: not a transformers config (a JSON object)")
    kind = config.get("model_type")
    if kind not in ("hubert", "wavlm", "data2vec-audio", "wav2vec2"):
        raise PretrainError(f"{folder} holds a transformers '{kind}' model ({', '.join(config.get('architectures') or [])}); "
                            "pretrain imports HubertModel, WavLMModel, Data2VecAudioModel and Wav2Vec2Model "
                            "(or Wav2Vec2ForPreTraining)")
    needed = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"]
    absent = [name for name in needed if not isinstance(config.get(name), int)]
    if absent:
        raise PretrainError(f"{path}: no {', '.join(absent)} (the model's shape cannot be known)")
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin",
                                                      "model.safetensors.index.json", "pytorch_model.bin.index.json")):
        raise PretrainError(f"{folder} has a config.json but no weights file (model.safetensors or pytorch_model.bin)")
    conv = (config.get("conv_dim"), config.get("conv_kernel"), config.get("conv_stride"))
    ours = ([CONV_CHANNELS] * len(CONV_LAYERS), [k for k, _ in CONV_LAYERS], [s for _, s in CONV_LAYERS])
    if tuple(map(list, conv)) != ours:
        raise PretrainError(f"{path}: a waveform encoder of conv_dim/kernel/stride {conv}, not HuBERT's {ours}")
    if kind == "hubert" and not config.get("feat_proj_layer_norm", True):
        raise PretrainError(f"{path}: feat_proj_layer_norm=false (a wav2vec 2.0-style projection) is not HuBERT's")
    do_normalize = False
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        do_normalize = bool(json.loads(pre.read_text()).get("do_normalize", False))
    if kind == "data2vec-audio":
        # Fixed in Data2VecAudio: LayerNorm after every waveform convolution, post-LN; its
        # num_conv_pos_embeddings counts positional convolutions of conv_pos_kernel_size each.
        network = dict(extractor_mode="layer_norm", layer_norm_first=False, conv_pos=config.get("conv_pos_kernel_size", 19),
                       conv_pos_depth=config.get("num_conv_pos_embeddings", 5))
    else:
        network = dict(extractor_mode="layer_norm" if config.get("feat_extract_norm") == "layer" else "group_norm",
                       layer_norm_first=bool(config.get("do_stable_layer_norm", False)),
                       conv_pos=config.get("num_conv_pos_embeddings", 128))
    cfg = ModelConfig(
        arch="wavlm" if kind == "wavlm" else "hubert", encoder_layers=config["num_hidden_layers"],
        encoder_embed_dim=config["hidden_size"], encoder_ffn_embed_dim=config["intermediate_size"],
        encoder_attention_heads=config["num_attention_heads"], conv_bias=bool(config.get("conv_bias", False)),
        conv_pos_groups=config.get("num_conv_pos_embedding_groups", 16), normalize_waveform=do_normalize, **network,
        **({"num_buckets": config.get("num_buckets", 320), "max_distance": config.get("max_bucket_distance", 800)}
           if kind == "wavlm" else {}))
    pretraining = kind == "wav2vec2" and "Wav2Vec2ForPreTraining" in (config.get("architectures") or [])
    if pretraining:
        cfg.objective = "wav2vec2"
        cfg.final_dim = config.get("proj_codevector_dim", 256)
        cfg.logit_temp = config.get("contrastive_logits_temperature", 0.1)
        w = cfg.wav2vec2
        w.num_groups, w.num_vars = config.get("num_codevector_groups", 2), config.get("num_codevectors_per_group", 320)
        w.codevector_dim = config.get("codevector_dim", 256)
        w.num_negatives = config.get("num_negatives", 100)
        w.diversity_weight = config.get("diversity_loss_weight", 0.1)
    import transformers

    name = {"wavlm": "WavLMModel", "hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model"}.get(kind, "Data2VecAudioModel")
    if pretraining:
        name = "Wav2Vec2ForPreTraining"
    try:
        hf, info = getattr(transformers, name).from_pretrained(folder, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - a truncated or damaged weights file (safetensors has its own errors)
        raise PretrainError(f"{folder}: transformers could not read the weights ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    # What the weights file itself holds, as transformers read it: its state afterwards has no
    # gaps, because from_pretrained fills every missing weight with a fresh random one.
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(what):
            names = sorted(str(k) for k in info[what])
            raise PretrainError(f"{folder}: the weights file has {len(names)} {what.replace('_keys', '')} "
                                f"parameters for a {type(hf).__name__}: {', '.join(names[:8])}"
                                f"{' ...' if len(names) > 8 else ''}; refusing to import a model that would be "
                                "partly random")
    if pretraining:
        model = Wav2Vec2Pretrain(cfg)
        state = hf.state_dict()
        _load_strict(model, {k.removeprefix("wav2vec2."): v for k, v in state.items() if k.startswith("wav2vec2.")},
                     str(folder))
        for head in ("quantizer", "project_q", "project_hid"):
            getattr(model, head).load_state_dict({k.removeprefix(f"{head}."): v for k, v in state.items()
                                                  if k.startswith(f"{head}.")}, strict=True)
        return model
    model = _backbone_model(cfg)
    _load_strict(model, hf.state_dict(), str(folder))
    return model


class FairseqDictionary:
    """A fairseq ``Dictionary`` as a released HuBERT checkpoint pickles it in ``task_state`` (the
    label dictionary: ``symbols``, ``count``, ``indices`` and the special symbols), read as
    data: fairseq's class is never imported, and nothing of it runs."""

    def __len__(self) -> int:
        return len(getattr(self, "symbols", []))

    @property
    def labels(self) -> list[str]:
        """The label symbols, the special ones (``<s>``, ``<pad>``, ...) left out."""
        return list(getattr(self, "symbols", []))[getattr(self, "nspecial", 0):]


def _numpy_scalar():
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved it; checkpoints name either
    return core.multiarray.scalar


# What a fairseq checkpoint may name besides tensors and plain types, each read as data: the
# arguments of old versions, the label dictionary of HuBERT's task state, and numpy scalars in
# the training metrics of extra_state.
FAIRSEQ_GLOBALS = {
    "argparse.Namespace": argparse.Namespace,
    "fairseq.data.dictionary.Dictionary": FairseqDictionary,
    "numpy.core.multiarray.scalar": _numpy_scalar(),
    "numpy._core.multiarray.scalar": _numpy_scalar(),
    "numpy.dtype": np.dtype,
}


def _fairseq_payload(path: Path) -> dict:
    """The checkpoint's dict, unpickled without running code: tensors and plain types, plus
    ``FAIRSEQ_GLOBALS``."""
    if path.stat().st_size == 0:
        raise PretrainError(f"{path}: an empty file, not a checkpoint")
    advice = ("loading it would run their code, so it is refused. Re-save it as a plain dict: torch.save({'cfg': "
              "OmegaConf.to_container(ckpt['cfg']), 'model': ckpt['model']}, path) in a trusted environment")
    try:
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                  if g not in FAIRSEQ_GLOBALS and not g.startswith("numpy.dtypes.")]
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch's legacy format, or no checkpoint at all,
        unsafe = []    # which the weights-only unpickler below reads or refuses without running anything
    if unsafe:
        raise PretrainError(f"{path} names Python objects ({', '.join(unsafe[:6])}); {advice}")
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in FAIRSEQ_GLOBALS.items()] + dtypes):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise PretrainError(f"{path} names Python objects beyond tensors and plain types; {advice}") from None
        raise PretrainError(f"{path} is not a torch checkpoint (its bytes do not unpickle as one)") from None
    except Exception as e:  # noqa: BLE001 - truncated, random or foreign bytes
        raise PretrainError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _label_dictionaries(task_state) -> list[tuple[str, FairseqDictionary]]:
    """(label name, dictionary) of a HuBERT task state: ``{"pt_dictionaries": {"km": D}}`` in
    today's fairseq (``ft_dictionaries`` when fine-tuning), a list under ``dictionaries`` in
    older ones."""
    found = []
    for key, value in (task_state or {}).items() if isinstance(task_state, dict) else ():
        if isinstance(value, dict):
            found += [(str(name), d) for name, d in value.items() if isinstance(d, FairseqDictionary)]
        elif isinstance(value, (list, tuple)):
            found += [(f"{key}[{i}]", d) for i, d in enumerate(value) if isinstance(d, FairseqDictionary)]
    return found


def import_fairseq(path: str | Path, report: list[str] | None = None) -> HubertPretrain:
    """The backbone of a fairseq HuBERT checkpoint: a released one (fairseq's trainer layout,
    its label ``Dictionary`` in ``task_state`` read as data), ``{"cfg": {"model": ...}, "model":
    state}``, or the older ``{"args": Namespace, "model": state}``. Lines for the user about
    what else the checkpoint held go to ``report``."""
    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"{path}: no such checkpoint file")
    payload = _fairseq_payload(path)
    if not isinstance(payload, dict) or "model" not in payload:
        raise PretrainError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    dictionaries = _label_dictionaries(payload.get("task_state"))
    embeddings = payload["model"].get("label_embs_concat") if isinstance(payload["model"], dict) else None
    if dictionaries and embeddings is not None and len(embeddings) != sum(len(d) for _, d in dictionaries):
        names = ", ".join(f"'{n}' has {len(d)} symbols" for n, d in dictionaries)
        raise PretrainError(f"{path}: label_embs_concat has {len(embeddings)} rows, but the label dictionary {names} "
                            "(labels and special symbols): the checkpoint is damaged or put together from two")
    for name, d in dictionaries:
        (report if report is not None else []).append(
            f"fairseq label dictionary '{name}': {len(d.labels)} labels (+{len(d) - len(d.labels)} special "
            "symbols); the label embeddings and final_proj are left out (they belong to that clustering)")
    fields = (payload.get("cfg") or {}).get("model") if isinstance(payload.get("cfg"), dict) else None
    if fields is None and payload.get("args") is not None:
        fields = vars(payload["args"])
    if not fields:
        raise PretrainError(f"{path}: no model configuration ('cfg' → 'model', or 'args')")
    if fields.get("_name", "hubert") != "hubert" and fields.get("arch", "hubert") not in ("hubert",):
        raise PretrainError(f"{path}: a fairseq '{fields.get('_name') or fields.get('arch')}' model, not HuBERT")
    values = {ours: fields[theirs] for theirs, ours in _FAIRSEQ_FIELDS.items() if theirs in fields}
    mode = fields.get("extractor_mode", "default")
    values["extractor_mode"] = "layer_norm" if mode == "layer_norm" else "group_norm"
    values["normalize_waveform"] = bool((payload.get("cfg") or {}).get("task", {}).get("normalize", False)) \
        if isinstance(payload.get("cfg"), dict) else False
    cfg = ModelConfig(**values)
    state, leftover = {}, []
    for key, tensor in payload["model"].items():
        if key in FAIRSEQ_HEADS:
            continue
        for pattern, target in FAIRSEQ:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, target, key)] = tensor
                break
        else:
            leftover.append(key)
    if leftover:
        raise PretrainError(f"{path}: parameters pretrain does not know: {sorted(leftover)}")
    model = _backbone_model(cfg)
    _load_strict(model, state, str(path))
    return model


def to_fairseq(model: HubertPretrain) -> dict:
    """Our backbone under fairseq's parameter names: ``FAIRSEQ`` run backwards (the waveform
    encoder's norm sits at ``.2.`` after a GroupNorm, ``.2.1.`` inside fairseq's LayerNorm
    wrapper). The tests build fairseq-format checkpoints with it."""
    norm = r"2.1" if model.cfg.extractor_mode == "layer_norm" else r"2"
    inverse = [
        (r"masked_spec_embed", "mask_emb"),
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.0.\2"),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)",
         rf"feature_extractor.conv_layers.\1.{norm}.\2"),
        (r"feature_projection\.layer_norm\.(weight|bias)", r"layer_norm.\1"),
        (r"feature_projection\.projection\.(weight|bias)", r"post_extract_proj.\1"),
        (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
        (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
        (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
        (r"encoder\.layers\.(\d+)\.attention\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.self_attn.\2_proj.\3"),
        (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    ]
    out = {}
    for key, tensor in model.backbone.state_dict().items():
        for pattern, target in inverse:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = tensor
                break
        else:
            raise KeyError(f"no fairseq name for {key}")
    return out
