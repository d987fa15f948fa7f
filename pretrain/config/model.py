"""Configuration of the HuBERT model (``pretrain.model``). Defaults are HuBERT BASE
(fairseq ``hubert_base_librispeech.yaml`` and the model's defaults; see
../shared/notes/hubert-recipe.md); ``configs/model/*.yaml`` hold the other sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pretrain.config.core import ConfigError


@dataclass
class Data2VecConfig:
    """data2vec (Baevski et al., 2022) as published for speech, fairseq's ``data2vec_audio``
    defaults: an EMA teacher of the Transformer layers sees the unmasked input; the student
    regresses, at masked frames, the average of the teacher's top layers."""

    ema_decay: float = 0.999
    """Teacher decay at the first update."""

    ema_end_decay: float = 0.9999
    """Teacher decay from ``ema_anneal_steps`` updates on."""

    ema_anneal_steps: int = 30000
    """Updates over which the decay rises linearly from ``ema_decay`` to ``ema_end_decay``."""

    top_k_layers: int = 8
    """Targets: the average of the teacher's top K layers' feed-forward outputs (before the
    layer's last residual connection), each normalized per utterance and channel over its
    unpadded frames (instance norm)."""

    loss_beta: float = 0.0
    """0: squared error; > 0: smooth L1 with this beta."""

    loss_scale: Optional[float] = None
    """Multiplies the per-frame loss (summed over channels); None: 1/sqrt(encoder_embed_dim)."""

    min_target_var: float = 0.1
    """Collapse guard: training stops, saying so, when the targets' standard deviation over
    frames (mean over channels) falls below this ..."""

    min_pred_var: float = 0.01
    """... or the predictions' falls below this ..."""

    collapse_check_after: int = 5000
    """... from this many updates on (both start low while the teacher is near the student)."""


@dataclass
class Wav2Vec2Config:
    """wav2vec 2.0 (Baevski et al., 2020) as published, fairseq's ``wav2vec2_base`` and
    transformers' ``Wav2Vec2Config`` defaults: the targets are a Gumbel-softmax product
    quantization of the unmasked front-end output, learned jointly; the loss is contrastive.
    The masking (``mask_prob`` 0.65, ``mask_length`` 10 in the paper), the logit temperature
    (``logit_temp``, 0.1), the projection size (``final_dim``) and the feature penalty
    (``feature_pen_weight``) are the model's own fields."""

    num_groups: int = 2
    """G: codebooks; a target is the concatenation of one entry of each."""

    num_vars: int = 320
    """V: entries per codebook."""

    codevector_dim: int = 256
    """Size of a quantized vector (each group's entry has codevector_dim / G); ``project_q``
    maps it to ``final_dim``."""

    temp_start: float = 2.0
    """Gumbel-softmax temperature at the first update ..."""

    temp_end: float = 0.5
    """... never below this ..."""

    temp_decay: float = 0.999995
    """... multiplied by this per update: temperature = max(temp_start * temp_decay^updates, temp_end)."""

    num_negatives: int = 100
    """K: distractors per masked frame, drawn uniformly (with replacement) from the other masked
    frames of the same utterance; padding and the frame itself are never drawn."""

    diversity_weight: float = 0.1
    """alpha: weight of the diversity loss (GV - perplexity) / GV per masked frame, where the
    perplexity is exp(entropy) of each group's softmax averaged over the batch's masked frames,
    summed over groups."""

    min_code_perplexity: float = 2.0
    """Collapse guard: training stops, saying so, when some codebook's perplexity of hard codes
    over a log window's masked frames stays below this (1: one entry for everything) ..."""

    collapse_windows: int = 3
    """... for this many log windows in a row ..."""

    collapse_check_after: int = 1000
    """... from this many updates on."""


@dataclass
class ModelConfig:
    arch: str = "hubert"
    """``hubert``, or ``wavlm``: the same network plus WavLM's gated relative position bias in
    every attention layer (exported as ``transformers.WavLMModel``)."""

    num_buckets: int = 320
    """WavLM: relative-position buckets (T5-style: half per direction, half of those exact,
    the rest logarithmic up to ``max_distance``)."""

    max_distance: int = 800
    """WavLM: distance in frames at which the logarithmic buckets end; farther frames share the
    last bucket (WavLM Base/Base+/Large: 800)."""

    frontend: str = "conv"
    """``conv``: HuBERT's convolutional waveform encoder (exported to transformers). ``fbank``:
    a fixed log-mel filterbank on the same 50 Hz frame grid (``pretrain.model.fbank``), much
    cheaper on CPUs; transformers' HubertModel/WavLMModel have no such input, so these models
    are not exportable there."""

    fbank_bins: int = 80
    """Fbank front end: mel filters per 25 ms window."""

    fbank_context: int = 1
    """Fbank front end: 10 ms frames stacked on each side of a 50 Hz frame's centre frame (1:
    three frames, 30 ms of hop around the centre)."""

    fbank_norm: str = "utterance"
    """Fbank front end: ``utterance`` (mean and variance normalization per utterance and
    dimension over its valid frames) or ``none``."""

    extractor_mode: str = "group_norm"
    """Waveform encoder normalization: ``group_norm`` (one GroupNorm after the first conv, BASE)
    or ``layer_norm`` (a LayerNorm after every conv, LARGE)."""

    conv_bias: bool = False
    """Bias in the waveform encoder's convolutions (HuBERT: none)."""

    encoder_layers: int = 12
    """Transformer layers."""

    encoder_embed_dim: int = 768
    """Transformer width."""

    encoder_ffn_embed_dim: int = 3072
    """Transformer feed-forward width."""

    encoder_attention_heads: int = 12
    """Attention heads (the paper's table says 8 for BASE; fairseq's config and the released
    checkpoints use 12)."""

    layer_norm_first: bool = False
    """Pre-LN Transformer (LARGE) instead of post-LN (BASE)."""

    conv_pos: int = 128
    """Kernel of the convolutional relative positional embedding."""

    conv_pos_groups: int = 16
    """Groups of the convolutional relative positional embedding."""

    conv_pos_depth: int = 1
    """Convolutions of the positional embedding. 1: HuBERT's one convolution of kernel
    ``conv_pos``, weight-normalized. More: data2vec's stack of this many plain convolutions of
    kernel ``conv_pos`` each, each followed by a LayerNorm without parameters and a GELU (data2vec
    audio: 5 of kernel 19); with ``extractor_mode: layer_norm`` and a post-LN Transformer it
    exports as ``transformers.Data2VecAudioModel``."""

    dropout: float = 0.1
    """Dropout in the Transformer (residual branches)."""

    attention_dropout: float = 0.1
    """Dropout on attention weights."""

    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation."""

    encoder_layerdrop: float = 0.05
    """Probability of skipping a whole Transformer layer in training."""

    dropout_input: float = 0.1
    """Dropout on the projected features before masking."""

    dropout_features: float = 0.1
    """Dropout on the unmasked features (kept for parity with fairseq; unused by the loss)."""

    feature_grad_mult: float = 0.1
    """Gradient scale into the waveform encoder (0 freezes it; the Fbank front end has no
    parameters)."""

    normalize_waveform: bool = False
    """Normalize each waveform to zero mean and unit variance over its valid samples (LARGE,
    with ``layer_norm`` extraction)."""

    mask_prob: float = 0.8
    """Span-start probability times span length: ``mask_prob * T / mask_length`` spans start
    per utterance (about 57 % of frames masked)."""

    mask_length: int = 10
    """Frames per masked span."""

    mask_min_spans: int = 2
    """At least this many spans per utterance."""

    final_dim: int = 256
    """Dimension of the projection and label embeddings compared by cosine similarity."""

    untie_final_proj: bool = True
    """One projection slice per label set instead of a shared one."""

    logit_temp: float = 0.1
    """Temperature of the cosine-similarity logits."""

    pred_masked_weight: float = 1.0
    """Weight of the cross-entropy on masked frames."""

    pred_nomask_weight: float = 0.0
    """Weight of the cross-entropy on unmasked frames."""

    feature_pen_weight: float = 10.0
    """Weight of the L2 penalty on the waveform encoder's output (none with the Fbank front end:
    its output is fixed)."""

    objective: str = "hubert"
    """``hubert``: masked prediction of cluster labels (``data.labels``). ``data2vec``: masked
    regression of an EMA teacher's representations (``data2vec``); no labels, no clustering.
    ``wav2vec2``: contrastive prediction of jointly learned quantized targets (``wav2vec2``);
    no labels, no clustering."""

    data2vec: Data2VecConfig = field(default_factory=Data2VecConfig)
    """The data2vec objective's settings (used with ``objective: data2vec``)."""

    wav2vec2: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    """The wav2vec 2.0 objective's settings (used with ``objective: wav2vec2``)."""

    checkpoint_activations: bool = False
    """Recompute each encoder layer's activations in the backward pass instead of keeping
    them (``torch.utils.checkpoint``): less activation memory for about one more forward of
    the encoder per step, for LARGE/X-LARGE or longer crops per GPU. Gradients are unchanged:
    dropout masks are replayed."""

    compile: bool = False
    """Training: compile each encoder layer with ``torch.compile`` (Inductor; Triton on GPUs, a
    C++ compiler on CPUs). Parameter names, checkpoints and exports are those of the eager
    model, so it can be switched on or off across a resume."""

    def validate(self) -> None:
        if self.objective not in ("hubert", "data2vec", "wav2vec2"):
            raise ConfigError(f"must be 'hubert', 'data2vec' or 'wav2vec2', got '{self.objective}'",
                              field="objective")
        w = self.wav2vec2
        for name in ("num_groups", "num_vars", "codevector_dim", "num_negatives", "collapse_windows"):
            if getattr(w, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(w, name)}", field=f"wav2vec2.{name}")
        if w.codevector_dim % w.num_groups:
            raise ConfigError(f"must be a multiple of num_groups={w.num_groups}, got {w.codevector_dim}",
                              field="wav2vec2.codevector_dim")
        if not 0 < w.temp_end <= w.temp_start:
            raise ConfigError(f"must be in (0, temp_start={w.temp_start}], got {w.temp_end}", field="wav2vec2.temp_end")
        if not 0 < w.temp_decay <= 1:
            raise ConfigError(f"must be in (0, 1], got {w.temp_decay}", field="wav2vec2.temp_decay")
        if w.diversity_weight < 0:
            raise ConfigError(f"must be >= 0, got {w.diversity_weight}", field="wav2vec2.diversity_weight")
        d2v = self.data2vec
        for name in ("ema_decay", "ema_end_decay"):
            if not 0.0 <= getattr(d2v, name) < 1.0:
                raise ConfigError(f"must be in [0, 1), got {getattr(d2v, name)}", field=f"data2vec.{name}")
        if d2v.ema_anneal_steps < 0:
            raise ConfigError(f"must be >= 0, got {d2v.ema_anneal_steps}", field="data2vec.ema_anneal_steps")
        if self.objective == "data2vec" and not 1 <= d2v.top_k_layers <= self.encoder_layers:
            raise ConfigError(f"must be in [1, encoder_layers={self.encoder_layers}], got {d2v.top_k_layers}",
                              field="data2vec.top_k_layers")
        if d2v.loss_beta < 0:
            raise ConfigError(f"must be >= 0, got {d2v.loss_beta}", field="data2vec.loss_beta")
        if self.arch not in ("hubert", "wavlm"):
            raise ConfigError(f"must be 'hubert' or 'wavlm', got '{self.arch}'", field="arch")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ConfigError(f"must be an even number >= 4, got {self.num_buckets}", field="num_buckets")
        if self.max_distance <= self.num_buckets // 4:
            raise ConfigError(f"must exceed the {self.num_buckets // 4} exact buckets per direction, got "
                              f"{self.max_distance}", field="max_distance")
        if self.frontend not in ("conv", "fbank"):
            raise ConfigError(f"must be 'conv' or 'fbank', got '{self.frontend}'", field="frontend")
        if self.fbank_bins < 1 or self.fbank_bins > 256:
            raise ConfigError(f"must be in [1, 256] (257 FFT bins), got {self.fbank_bins}", field="fbank_bins")
        if self.fbank_context < 0:
            raise ConfigError(f"must be >= 0, got {self.fbank_context}", field="fbank_context")
        if self.fbank_norm not in ("utterance", "none"):
            raise ConfigError(f"must be 'utterance' or 'none', got '{self.fbank_norm}'", field="fbank_norm")
        if self.extractor_mode not in ("group_norm", "layer_norm"):
            raise ConfigError(f"must be 'group_norm' or 'layer_norm', got '{self.extractor_mode}'",
                              field="extractor_mode")
        for name in ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                     "encoder_attention_heads", "conv_pos", "conv_pos_groups", "conv_pos_depth", "mask_length",
                     "final_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ConfigError(f"{self.encoder_embed_dim} is not divisible by encoder_attention_heads "
                              f"{self.encoder_attention_heads}", field="encoder_embed_dim")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by it",
                              field="conv_pos_groups")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                     "dropout_input", "dropout_features", "mask_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"must be in [0, 1), got {getattr(self, name)}", field=name)
        if self.feature_grad_mult < 0:
            raise ConfigError(f"must be >= 0, got {self.feature_grad_mult}", field="feature_grad_mult")
        if self.logit_temp <= 0:
            raise ConfigError(f"must be > 0, got {self.logit_temp}", field="logit_temp")
        if self.mask_min_spans < 0:
            raise ConfigError(f"must be >= 0, got {self.mask_min_spans}", field="mask_min_spans")
