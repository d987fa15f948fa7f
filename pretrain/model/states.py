"""A model's layer states: the one reader that feature dumping, the probes and the benchmarks use.

:class:`LayerStates` opens our ``model.pt`` (a file, or a checkpoint folder whose
``manifest.json`` sha256 of ``model.pt`` is checked first; ``expected_sha256`` checks the file
against a recorded digest) or a ``transformers`` HubertModel / WavLMModel / Data2VecAudioModel / Wav2Vec2Model
folder, and gives, for a list of 16 kHz float32 waveforms, every wanted layer's (frames, dim)
states from one forward that stops at the deepest wanted layer. Layer ``i`` (1-based) is the
raw output of Transformer layer ``i``, as fairseq's feature dumper and ``output_hidden_states``
give it; layer 0 is the front end's output (the model's own input; our models only). Every
utterance gets ``conv_num_frames(len)`` frames.

Batching never changes a result: utterances are sorted by length and batched up to
``batch_samples`` padded samples only when the model is batch-invariant
(``encoder.batch_invariant``); otherwise, and for transformers models, one per forward.
Utterances longer than ``chunk_seconds`` plus twice ``chunk_context`` run in windows (the
attention's memory grows with the square of the length: a 10-minute LibriLight file is 30,000
frames); what the model normalizes over a whole utterance (the waveform, a group-norm front
end's channels) is then normalized with the whole utterance's statistics, not the window's.
On a GPU the forwards run under bf16 autocast.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pretrain.frames import CONV_HOP, SAMPLE_RATE, conv_num_frames
from pretrain.model.checkpoint import load_model, resolve_model_file
from pretrain.model.encoder import batch_invariant
from pretrain.model.hubert import HubertPretrain
from pretrain.utils import PretrainError, sha256_file

HF_CLASSES = {"hubert": "HubertModel", "wavlm": "WavLMModel", "data2vec-audio": "Data2VecAudioModel",
              "wav2vec2": "Wav2Vec2Model"}
"""transformers ``model_type`` -> the class whose layer states are read."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PretrainError("device=cuda, but torch sees no CUDA GPU")
    return device


def checkpoint_sha256_problem(path: Path) -> str | None:
    """For a training checkpoint folder: whether its ``model.pt`` matches the manifest."""
    manifest = path / "manifest.json"
    if not (path.is_dir() and manifest.is_file()):
        return None
    digest = json.loads(manifest.read_text()).get("files", {}).get("model.pt")
    if digest is None:
        return None
    if sha256_file(path / "model.pt") != digest:
        return f"{path / 'model.pt'} does not match the sha256 in {manifest}: the checkpoint is damaged"
    return None


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "model.pt").is_file()


class LayerStates:
    """The layer states of one model; see the module docstring."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", expected_sha256: str | None = None,
                 batch_samples: int = 1_600_000, chunk_seconds: float = 30.0, chunk_context: float = 5.0):
        path = Path(checkpoint)
        if not path.exists():
            raise PretrainError(f"checkpoint {path} does not exist")
        problem = checkpoint_sha256_problem(path)
        if problem:
            raise PretrainError(problem)
        self.path, self.device = path, resolve_device(device)
        self.batch_samples, self.chunk_seconds, self.chunk_context = batch_samples, chunk_seconds, chunk_context
        if is_hf_dir(path):
            self.kind = "hf"
            self.model = _load_hf(path).to(self.device)
            self.sha256 = None
            cfg = self.model.config
            self.num_layers, self.dim, self.arch = cfg.num_hidden_layers, cfg.hidden_size, cfg.model_type
            self.invariant = False  # transformers' group-norm models must not see padding
            self.normalize = _hf_normalizes(path)
        else:
            file = resolve_model_file(path)
            self.kind = "pretrain"
            self.sha256 = sha256_file(file)
            if expected_sha256 is not None and self.sha256 != expected_sha256:
                raise PretrainError(f"{file} changed since it was recorded: it does not match its expected sha256 "
                                    f"({expected_sha256[:12]}…, found {self.sha256[:12]}…); it is damaged or "
                                    "another model: point at the original one, or refit")
            self.path = file
            self.model = load_model(file, map_location=self.device)
            cfg = self.model.cfg
            self.num_layers, self.dim, self.arch = cfg.encoder_layers, cfg.encoder_embed_dim, cfg.arch
            self.invariant = batch_invariant(cfg)
            self.normalize = False  # our backbone normalizes by itself (cfg.normalize_waveform)
        self.model.eval()  # one place for both kinds: dropout off, the states are deterministic

    def untrained(self, seed: int) -> "LayerStates":
        """The same architecture at random initialization (its "no pretraining" twin)."""
        twin = copy.copy(self)
        torch.manual_seed(seed)
        if self.kind == "hf":
            twin.model = type(self.model)(self.model.config).to(self.device).eval()
        else:
            twin.model = HubertPretrain(self.model.cfg, self.model.labels).to(self.device).eval()
        twin.sha256 = None
        return twin

    def describe(self) -> str:
        return f"{self.kind} {self.arch} model, {self.num_layers} layers, {self.path}"

    def check_layers(self, layers: list[int]) -> None:
        for layer in layers:
            if not (0 if self.kind == "pretrain" else 1) <= layer <= self.num_layers:
                raise PretrainError(f"layer {layer} does not exist: {self.path} has {self.num_layers} "
                                    "Transformer layers (1-based; 0 is our models' front end)")

    def __call__(self, waves: list[np.ndarray], layers: list[int], progress: bool = False,
                 desc: str = "forward") -> dict[int, list[np.ndarray]]:
        """{layer: [(frames, dim) float32 per utterance, in the order of ``waves``]}."""
        self.check_layers(layers)
        out: dict[int, list] = {layer: [None] * len(waves) for layer in layers}
        limit = (self.chunk_seconds + 2 * self.chunk_context) * SAMPLE_RATE
        short = []
        for i, wave in enumerate(waves):
            if len(wave) > limit:
                for layer, states in self._windowed(wave, layers).items():
                    out[layer][i] = states
            else:
                short.append(i)
        batches, batch = [], []
        for i in sorted(short, key=lambda i: len(waves[i])):  # the batch's padded size is its last item's
            if batch and (not self.invariant or (len(batch) + 1) * len(waves[i]) > self.batch_samples):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
        for indices in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            audio = torch.zeros(len(indices), len(waves[indices[-1]]))
            for row, i in enumerate(indices):
                audio[row, :len(waves[i])] = torch.from_numpy(self._input(waves[i]))
            lengths = torch.tensor([len(waves[i]) for i in indices])
            states = self._forward(audio, lengths, layers)
            for layer in layers:
                h = states[layer].float().cpu().numpy()
                for row, i in enumerate(indices):
                    out[layer][i] = h[row, :conv_num_frames(len(waves[i]))].copy()
        return out

    def _input(self, wave: np.ndarray) -> np.ndarray:
        if self.normalize:  # what transformers' feature extractor does
            wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
        return np.ascontiguousarray(wave, dtype=np.float32)

    def _forward(self, audio: torch.Tensor, lengths: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        audio, lengths = audio.to(self.device), lengths.to(self.device)
        deepest = max(layers)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            if self.kind == "hf":
                states = list(self.model(audio, output_hidden_states=True).hidden_states)
            else:
                states, _ = self.model.backbone.all_hidden_states(audio, lengths, front_end=True, upto=deepest)
        return {layer: states[layer] for layer in layers}

    def _first_group_norm(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(conv, norm) of a front end whose first norm spans a channel's whole time axis."""
        if self.kind == "hf":
            if getattr(self.model.config, "feat_extract_norm", None) != "group":
                return None
            first = self.model.feature_extractor.conv_layers[0]
        else:
            if self.model.cfg.frontend != "conv":
                return None
            first = self.model.backbone.feature_extractor.conv_layers[0]
            if first.norm != "group":
                return None
        return first.conv, first.layer_norm

    def _utterance_statistics(self, wave: np.ndarray, conv: torch.nn.Conv1d) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and variance of the first convolution's output over the whole
        utterance, streamed 2 s of output frames at a time."""
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        outputs = (len(wave) - kernel) // stride + 1
        piece = stride * 200_000
        s1 = torch.zeros(conv.out_channels, dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        done = 0
        with torch.no_grad():
            while done < outputs:
                take = min(piece // stride, outputs - done)
                start = done * stride
                segment = torch.from_numpy(np.ascontiguousarray(wave[start:start + (take - 1) * stride + kernel]))
                y = conv(segment[None, None].to(self.device)).double().cpu()[0]
                s1 += y.sum(-1)
                s2 += (y ** 2).sum(-1)
                done += take
        mean = s1 / outputs
        return mean.float(), (s2 / outputs - mean ** 2).clamp_min(0).float()

    def _windowed(self, wave: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
        """One long utterance in windows: each contributes ``chunk_seconds`` of frames and sees
        ``chunk_context`` more on either side; window starts sit on the 320-sample frame grid,
        so window frame j is utterance frame start/320 + j."""
        own_normalize = self.kind == "pretrain" and self.model.backbone.cfg.normalize_waveform
        if own_normalize:
            wave = ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)
        else:
            wave = self._input(wave)
        hook = None
        first = self._first_group_norm()
        if first is not None:
            conv, norm = first
            mean, var = (t.to(self.device) for t in self._utterance_statistics(wave, conv))

            def global_norm(module, inputs, output):
                x = inputs[0]
                scale = (module.weight / torch.sqrt(var + module.eps)).to(x.dtype)
                shift = module.bias[None, :, None].to(x.dtype)
                return (x - mean[None, :, None].to(x.dtype)) * scale[None, :, None] + shift

            hook = norm.register_forward_hook(global_norm)
        if own_normalize:
            self.model.backbone.cfg.normalize_waveform = False
        normalize, self.normalize = self.normalize, False  # done above, over the whole utterance
        try:
            return self._windows(wave, layers)
        finally:
            self.normalize = normalize
            if own_normalize:
                self.model.backbone.cfg.normalize_waveform = True
            if hook is not None:
                hook.remove()

    def _windows(self, wave: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
        core = max(1, int(self.chunk_seconds * SAMPLE_RATE) // CONV_HOP) * CONV_HOP
        context = int(self.chunk_context * SAMPLE_RATE) // CONV_HOP * CONV_HOP
        total = conv_num_frames(len(wave))
        parts: dict[int, list] = {layer: [] for layer in layers}
        for start in range(0, len(wave), core):
            first, last = start // CONV_HOP, min((start + core) // CONV_HOP, total)
            if first >= last:
                break
            # + 80: a frame's 400-sample receptive field reaches 80 samples past its 320-sample hop
            lo, hi = max(0, start - context), min(len(wave), start + core + context + 80)
            states = self._forward(torch.from_numpy(np.ascontiguousarray(wave[lo:hi]))[None],
                                   torch.tensor([hi - lo]), layers)
            offset = lo // CONV_HOP
            for layer in layers:
                parts[layer].append(states[layer][0, first - offset:last - offset].float().cpu().numpy())
        return {layer: np.concatenate(p) for layer, p in parts.items()}


def _load_hf(path: Path):
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError as e:
        raise PretrainError(f"reading a transformers model needs transformers: {e}") from None
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in HF_CLASSES:
        raise PretrainError(f"{path}: model_type '{model_type}' is not one of {', '.join(HF_CLASSES)}")
    return getattr(transformers, HF_CLASSES[model_type]).from_pretrained(path)


def _hf_normalizes(path: Path) -> bool:
    from transformers import Wav2Vec2FeatureExtractor

    try:
        return bool(Wav2Vec2FeatureExtractor.from_pretrained(path).do_normalize)
    except OSError:
        return False
