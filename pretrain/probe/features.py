"""Frozen features of every probed row, on the model's 50 Hz grid.

A *row* is one thing the probes judge: the model (one entry per layer), or a baseline — MFCC-39
and 80-bin log-mel (each 100 Hz frame ``2i`` stands for 50 Hz frame ``i``, the same centre), and
the model's architecture at random initialization (``untrained``, the "no pretraining" row).
Every row holds, per layer, one (frames, dim) float32 array of all utterances concatenated in
evaluation-set order; ``offsets`` (shared by every row) delimit the utterances, which have
``conv_num_frames(len(audio))`` frames each.

Models: our ``model.pt`` (or a checkpoint folder: its ``manifest.json`` sha256 of ``model.pt``
is checked first) gives every layer from one forward (``all_hidden_states``); a
``transformers`` HubertModel / WavLMModel / Data2VecAudioModel folder gives its ``hidden_states[1:]``. Forwards are
batched by length up to ``batch_samples`` (one utterance at a time for group-norm front ends,
whose norm spans the padded time axis), under bf16 autocast on a GPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.utils import PretrainError, sha256_file
from pretrain.frames import conv_num_frames

log = logging.getLogger(__name__)


@dataclass
class Row:
    name: str
    kind: str
    """``model``, ``baseline``."""
    layers: dict[int, np.ndarray]
    """Layer number (1-based; 0 for a baseline's single representation) -> (frames, dim)."""
    description: str


def offsets_of(waves: list[np.ndarray]) -> np.ndarray:
    counts = [conv_num_frames(len(w)) for w in waves]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) >= n:
        return x[:n]
    if len(x) == 0:
        return np.zeros((n, x.shape[1]), dtype=x.dtype)
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def mfcc_row(waves: list[np.ndarray]) -> Row:
    from pretrain.features.mfcc import mfcc_39

    feats = [_fit(mfcc_39(w)[::2], conv_num_frames(len(w))) for w in waves]
    return Row("mfcc", "baseline", {0: np.concatenate(feats).astype(np.float32)},
               "MFCC-39 (13 + deltas + delta-deltas), 100 Hz frame 2i for 50 Hz frame i")


def logmel_row(waves: list[np.ndarray], bins: int = 80) -> Row:
    import torch

    from pretrain.model.fbank import FbankFrontEnd

    # The Fbank front end without context or normalization: plain Kaldi log-mel energies on
    # the 50 Hz grid, exactly the frames the models see.
    fbank = FbankFrontEnd(bins, 0, "none")
    feats = []
    with torch.no_grad():
        for w in waves:
            feats.append(fbank(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0].numpy())
    return Row("logmel", "baseline", {0: np.concatenate(feats).astype(np.float32)},
               f"{bins}-bin Kaldi log-mel, 50 Hz")


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


class ModelSource:
    """A model whose layers are probed: ours (``model.pt``) or a transformers folder."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", expected_sha256: str | None = None):
        import torch

        path = Path(checkpoint)
        if not path.exists():
            raise PretrainError(f"checkpoint {path} does not exist")
        problem = checkpoint_sha256_problem(path)
        if problem:
            raise PretrainError(problem)
        self.path, self.device, self.torch = path, device, torch
        if is_hf_dir(path):
            self.kind = "hf"
            self.model = self._load_hf(path)
            self.num_layers = self.model.config.num_hidden_layers
            self.one_by_one = True  # transformers' group-norm models must not see padding
            self.sha256 = None
            self.arch = self.model.config.model_type
        else:
            from pretrain.model.checkpoint import load_model, resolve_model_file
            from pretrain.model.encoder import batch_invariant

            file = resolve_model_file(path)
            self.kind = "pretrain"
            self.sha256 = sha256_file(file)
            if expected_sha256 is not None and self.sha256 != expected_sha256:
                raise PretrainError(f"{file} does not match its expected sha256 ({expected_sha256[:12]}…, "
                                    f"found {self.sha256[:12]}…): the model file is damaged or another one")
            self.model = load_model(file, map_location=device).eval()
            cfg = self.model.cfg
            self.num_layers = cfg.encoder_layers
            self.one_by_one = not batch_invariant(cfg)
            self.arch = cfg.arch

    @staticmethod
    def _load_hf(path: Path):
        try:
            from transformers import AutoConfig, Data2VecAudioModel, HubertModel, WavLMModel
        except ImportError as e:
            raise PretrainError(f"probing a transformers model needs transformers: {e}") from None
        model_type = AutoConfig.from_pretrained(path).model_type
        classes = {"hubert": HubertModel, "wavlm": WavLMModel, "data2vec-audio": Data2VecAudioModel}
        if model_type not in classes:
            raise PretrainError(f"{path}: model_type '{model_type}' is not hubert, wavlm or data2vec-audio")
        return classes[model_type].from_pretrained(path).eval()

    def untrained(self, seed: int) -> "ModelSource":
        """The same architecture at random initialization (its "no pretraining" twin)."""
        import copy

        torch = self.torch
        twin = copy.copy(self)
        torch.manual_seed(seed)
        if self.kind == "hf":
            twin.model = type(self.model)(self.model.config).eval()
        else:
            from pretrain.model.hubert import HubertPretrain

            twin.model = HubertPretrain(self.model.cfg, self.model.labels).to(self.device).eval()
        twin.sha256 = None
        return twin

    def normalize_input(self) -> bool:
        if self.kind == "hf":
            from transformers import Wav2Vec2FeatureExtractor

            try:
                return bool(Wav2Vec2FeatureExtractor.from_pretrained(self.path).do_normalize)
            except OSError:
                return False
        return False  # our backbone normalizes by itself (cfg.normalize_waveform)

    def layers(self, waves: list[np.ndarray], wanted: list[int], batch_samples: int,
               progress: bool = False, desc: str = "forward") -> dict[int, np.ndarray]:
        """{layer: (frames, dim)} for the ``wanted`` 1-based layers, utterances concatenated."""
        from tqdm import tqdm

        torch = self.torch
        out: dict[int, list] = {layer: [None] * len(waves) for layer in wanted}
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        batches, batch = [], []
        for i in order:
            if batch and (self.one_by_one or (len(batch) + 1) * len(waves[i]) > batch_samples):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
        normalize = self.normalize_input()
        cuda = self.device.startswith("cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for indices in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
                longest = len(waves[indices[-1]])
                audio = torch.zeros(len(indices), longest)
                for row, i in enumerate(indices):
                    w = waves[i]
                    if normalize:  # what transformers' feature extractor does
                        w = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
                    audio[row, :len(w)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
                lengths = torch.tensor([len(waves[i]) for i in indices])
                audio, lengths = audio.to(self.device), lengths.to(self.device)
                if self.kind == "hf":
                    states = self.model(audio, output_hidden_states=True).hidden_states[1:]
                else:
                    states, _ = self.model.backbone.all_hidden_states(audio, lengths)
                for layer in wanted:
                    h = states[layer - 1].float().cpu().numpy()
                    for row, i in enumerate(indices):
                        out[layer][i] = h[row, :conv_num_frames(len(waves[i]))]
        return {layer: np.concatenate(parts).astype(np.float32) for layer, parts in out.items()}

    def describe(self) -> str:
        return f"{self.kind} {self.arch} model, {self.num_layers} layers, {self.path}"
