"""Export to ``transformers.HubertModel`` (``WavLMModel`` for ``arch: wavlm``,
``Data2VecAudioModel`` for data2vec's positional convolutions, ``conv_pos_depth`` > 1,
``Wav2Vec2ForPreTraining`` for the wav2vec 2.0 objective: its backbone loads as
``Wav2Vec2Model``, its quantizer and projections are the pretraining heads): the
backbone's weights under their own names (ours follow transformers'), a config that rebuilds
the same network, and a ``preprocessor_config.json`` saying whether waveforms are normalized."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from pretrain.config.model import ModelConfig
from pretrain.frames import CONV_LAYERS
from pretrain.model.checkpoint import load_model
from pretrain.model.encoder import CONV_CHANNELS
from pretrain.utils import PretrainError, settle_existing


def hf_class_name(cfg: ModelConfig) -> str:
    """The transformers class a model of ``cfg`` exports to; a clear error where there is none."""
    if cfg.objective == "wav2vec2":
        wrong = [f"{name}={value!r} (Wav2Vec2: {want!r})" for name, value, want in (
            ("arch", cfg.arch, "hubert"), ("conv_pos_depth", cfg.conv_pos_depth, 1)) if value != want]
        if wrong:
            raise PretrainError("a wav2vec 2.0 model exports as transformers.Wav2Vec2ForPreTraining, which this "
                                f"model does not fit: model.{', model.'.join(wrong)}")
        return "Wav2Vec2ForPreTraining"
    if cfg.conv_pos_depth == 1:
        return "WavLMModel" if cfg.arch == "wavlm" else "HubertModel"
    # Data2VecAudioModel is the one transformers model with the stacked positional convolution,
    # and it is fixed otherwise: LayerNorm after every waveform convolution, post-LN, no WavLM bias.
    wrong = [f"{name}={value!r} (Data2VecAudioModel: {want!r})" for name, value, want in (
        ("arch", cfg.arch, "hubert"), ("extractor_mode", cfg.extractor_mode, "layer_norm"),
        ("layer_norm_first", cfg.layer_norm_first, False)) if value != want]
    if wrong:
        raise PretrainError(f"model.conv_pos_depth={cfg.conv_pos_depth} (data2vec's positional convolutions) "
                            f"exports only as transformers.Data2VecAudioModel, which this model does not fit: "
                            f"model.{', model.'.join(wrong)}")
    return "Data2VecAudioModel"


def hf_config(cfg: ModelConfig):
    from transformers import Data2VecAudioConfig, HubertConfig, Wav2Vec2Config, WavLMConfig

    if hf_class_name(cfg) == "Wav2Vec2ForPreTraining":
        w = cfg.wav2vec2
        return Wav2Vec2Config(architectures=["Wav2Vec2ForPreTraining"], num_codevector_groups=w.num_groups,
                              num_codevectors_per_group=w.num_vars, codevector_dim=w.codevector_dim,
                              proj_codevector_dim=cfg.final_dim, contrastive_logits_temperature=cfg.logit_temp,
                              num_negatives=w.num_negatives, diversity_loss_weight=w.diversity_weight,
                              feat_quantizer_dropout=cfg.dropout_features, mask_time_prob=cfg.mask_prob,
                              mask_time_length=cfg.mask_length, mask_time_min_masks=cfg.mask_min_spans,
                              **_common_config(cfg))
    if hf_class_name(cfg) == "Data2VecAudioModel":
        common = _common_config(cfg)
        for name in ("feat_extract_norm", "do_stable_layer_norm"):  # fixed in Data2VecAudio
            del common[name]
        # Its num_conv_pos_embeddings counts the convolutions, each of conv_pos_kernel_size.
        common.update(num_conv_pos_embeddings=cfg.conv_pos_depth, conv_pos_kernel_size=cfg.conv_pos)
        return Data2VecAudioConfig(architectures=["Data2VecAudioModel"], **common)
    if cfg.arch == "wavlm":
        return WavLMConfig(num_buckets=cfg.num_buckets, max_bucket_distance=cfg.max_distance,
                           architectures=["WavLMModel"], **_common_config(cfg))
    return HubertConfig(feat_proj_layer_norm=True, architectures=["HubertModel"], **_common_config(cfg))


def hf_pretraining_state(model) -> dict:
    """A wav2vec 2.0 model's weights under ``Wav2Vec2ForPreTraining``'s names: the backbone under
    ``wav2vec2.``, the heads as they are (ours are named as transformers')."""
    state = {f"wav2vec2.{k}": v for k, v in model.backbone.state_dict().items()}
    for prefix in ("quantizer", "project_q", "project_hid"):
        state.update({f"{prefix}.{k}": v for k, v in getattr(model, prefix).state_dict().items()})
    return state


def _common_config(cfg: ModelConfig) -> dict:
    return dict(
        hidden_size=cfg.encoder_embed_dim,
        num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.encoder_attention_heads,
        intermediate_size=cfg.encoder_ffn_embed_dim,
        hidden_act="gelu",
        hidden_dropout=cfg.dropout,
        activation_dropout=cfg.activation_dropout,
        attention_dropout=cfg.attention_dropout,
        feat_proj_dropout=cfg.dropout_input,
        layerdrop=cfg.encoder_layerdrop,
        layer_norm_eps=1e-5,
        feat_extract_norm="layer" if cfg.extractor_mode == "layer_norm" else "group",
        feat_extract_activation="gelu",
        conv_dim=[CONV_CHANNELS] * len(CONV_LAYERS),
        conv_kernel=[k for k, _ in CONV_LAYERS],
        conv_stride=[s for _, s in CONV_LAYERS],
        conv_bias=cfg.conv_bias,
        num_conv_pos_embeddings=cfg.conv_pos,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        do_stable_layer_norm=cfg.layer_norm_first,
    )


def export_hf(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> bool:
    """Write a ``transformers`` model directory (:func:`hf_class_name`) for the model in
    ``checkpoint``; returns False when ``out_dir`` already held exactly this export (nothing
    written). Files of ``out_dir`` with other content are replaced only with ``overwrite``."""
    try:
        import transformers
        from transformers import Wav2Vec2FeatureExtractor
    except ImportError as e:
        raise PretrainError(f"export needs transformers (pip install transformers): {e}") from None
    model = load_model(checkpoint)
    if model.cfg.frontend != "conv":
        raise PretrainError(
            f"{checkpoint}: model.frontend is '{model.cfg.frontend}'; transformers' HubertModel, "
            "WavLMModel and Data2VecAudioModel only take waveforms through the convolutional encoder, "
            "so an Fbank model cannot be written in their format. Use the checkpoint with pretrain "
            "(features model, kmeans assign) instead.")
    try:
        name = hf_class_name(model.cfg)
    except PretrainError as e:
        raise PretrainError(f"{checkpoint}: {e}") from None
    hf = getattr(transformers, name)(hf_config(model.cfg))
    state = model.backbone.state_dict()
    if name == "Wav2Vec2ForPreTraining":
        state = hf_pretraining_state(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainError(f"parameter names differ from transformers': missing {missing}, "
                            f"unexpected {unexpected}")
    out = Path(out_dir)
    # Written beside the destination, then moved in with config.json last: config.json is what
    # marks an export (and transformers' from_pretrained) as complete, and save_pretrained
    # writes it before the weights.
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf.save_pretrained(tmp, safe_serialization=True)  # model.safetensors: no pickle to load
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0,
        do_normalize=model.cfg.normalize_waveform,
        # group-norm models must see unpadded audio; layer-norm ones take an attention mask
        return_attention_mask=model.cfg.extractor_mode == "layer_norm",
    ).save_pretrained(tmp)
    (tmp / "pretrain_export.json").write_text(json.dumps({
        "source": str(checkpoint), "labels": [s.__dict__ for s in model.labels],
        "note": "the quantizer and projections are wav2vec 2.0's pretraining heads" if name == "Wav2Vec2ForPreTraining"
        else "backbone only: final_proj and label embeddings are pretraining heads"}, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(checkpoint, model, hf))
    try:
        unchanged = settle_existing({out / p.name: p.read_bytes() for p in tmp.iterdir()}, overwrite,
                                    "or choose another out")
    except PretrainError:
        shutil.rmtree(tmp)
        raise
    if unchanged:
        shutil.rmtree(tmp)
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # an older export here is incomplete until the end
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(path, out / path.name)
    tmp.rmdir()
    return True


def _training_facts(checkpoint: str | Path) -> dict:
    """What the checkpoint's own folder and run directory say: the step, the training data's
    hours (the shard manifest the run's config names) and probe results of this checkpoint
    (a trainer's background probe, or ``iterate``'s probe stage)."""
    facts: dict = {}
    folder = Path(checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    try:
        facts["step"] = json.loads((folder / "manifest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return facts
    run = folder.parent.parent  # run_dir/checkpoints/step_N
    try:
        shards = yaml.safe_load((run / "config.yaml").read_text())["data"]["shards"]
        totals = json.loads((Path(shards) / "manifest.json").read_text())["totals"]
        facts["hours"] = totals["seconds"] / 3600
        facts["utterances"] = totals["utterances"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for probe in (run / "probes" / f"step_{facts['step']}" / "probe.json", run.parent / "probe" / "probe.json"):
        try:
            record = json.loads(probe.read_text())
        except (OSError, ValueError):
            continue
        if record.get("step") == facts["step"] or Path(record.get("checkpoint", "")).resolve() == folder.resolve():
            facts["probe"] = record["best"].get("model", {})
            facts["probe_file"] = str(probe)
            break
    return facts


def model_card(checkpoint: str | Path, model, hf) -> str:
    """The export's ``README.md``: architecture, training data and steps, label sets, probe
    results when the run has them; every figure read from the run's own files."""
    cfg = model.cfg
    facts = _training_facts(checkpoint)
    backbone = getattr(hf, "wav2vec2", hf)  # a Wav2Vec2ForPreTraining holds its heads too
    params = sum(p.numel() for p in backbone.parameters())
    kind = {"WavLMModel": "WavLM", "Data2VecAudioModel": "data2vec",
            "Wav2Vec2ForPreTraining": "wav2vec 2.0"}.get(type(hf).__name__, "HuBERT")
    objective = " (data2vec objective)" if cfg.objective == "data2vec" and kind != "data2vec" else ""
    lines = ["---", "library_name: transformers", f"tags: [speech, self-supervised, {kind.lower()}]", "---", "",
             f"# {kind}{objective} pretrained with pretrain", "",
             f"Exported from `{checkpoint}` by `pretrain export hf`. Load it with "
             f"`transformers.{type(hf).__name__}.from_pretrained(...)`.", "", "## Architecture", "",
             f"- {cfg.encoder_layers} Transformer layers, dimension {cfg.encoder_embed_dim}, "
             f"{cfg.encoder_attention_heads} heads, feed-forward {cfg.encoder_ffn_embed_dim}",
             f"- {params / 1e6:.2f}M parameters (the backbone"
             f"{')' if backbone is not hf else ': the pretraining heads are not exported)'}",
             f"- convolutional waveform encoder ({cfg.extractor_mode}), "
             f"{'pre' if cfg.layer_norm_first else 'post'}-LN; waveforms "
             f"{'normalized' if cfg.normalize_waveform else 'not normalized'} (see preprocessor_config.json)",
             "", "## Training", ""]
    if "step" in facts:
        lines.append(f"- {facts['step']} optimizer steps")
    if "hours" in facts:
        lines.append(f"- on {facts['hours']:.2f} h of audio ({facts['utterances']} utterances)")
    if cfg.objective == "data2vec":
        d = cfg.data2vec
        lines.append(f"- data2vec: masked regression of an EMA teacher's top {d.top_k_layers} layers (decay "
                     f"{d.ema_decay} to {d.ema_end_decay} over {d.ema_anneal_steps} updates)")
    elif cfg.objective == "wav2vec2":
        w = cfg.wav2vec2
        lines.append(f"- wav2vec 2.0: contrastive prediction of Gumbel-softmax quantized targets ({w.num_groups} "
                     f"codebooks of {w.num_vars} entries, {w.num_negatives} distractors, temperature {w.temp_start} "
                     f"to {w.temp_end}, diversity weight {w.diversity_weight}); the quantizer and projections are "
                     "in the export (`Wav2Vec2ForPreTraining`), the backbone loads as `Wav2Vec2Model`")
    else:
        labels = ", ".join(f"`{s.name}` ({s.num_classes} classes, {s.rate} Hz)" for s in model.labels)
        lines.append(f"- masked prediction of the label sets {labels}")
    if facts.get("probe"):
        lines += ["", "## Probes (held-out speech)", "", f"From `{facts['probe_file']}`:", "",
                  "| metric | best layer | value |", "|---|---|---|"]
        lines += [f"| {metric} | {b['layer']} | {b['value']:.4g} |" for metric, b in sorted(facts["probe"].items())]
    return "\n".join(lines) + "\n"
