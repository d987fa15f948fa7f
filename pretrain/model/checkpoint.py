"""The model file: consolidated weights with everything needed to rebuild the model.

``model.pt`` = ``torch.save({"format": "pretrain-model", "version": 1, "model_config": {...},
"labels": [{"name", "num_classes", "rate"}, ...], "state_dict": {...}})``, written atomically.
The trainer writes one into every checkpoint; export and feature dumping read it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.config.model import ModelConfig
from pretrain.model.data2vec import Data2VecPretrain
from pretrain.model.hubert import HubertPretrain, LabelSpec
from pretrain.model.wav2vec2 import Wav2Vec2Pretrain
from pretrain.utils import PretrainError, atomic_write_bytes, sha256_file

FORMAT = "pretrain-model"
VERSION = 1
MODEL_FILE = "model.pt"


def build_model(cfg: ModelConfig, labels: list[LabelSpec]):
    """The pretraining model ``cfg.objective`` names: HuBERT on ``labels``, data2vec or wav2vec 2.0."""
    if cfg.objective == "data2vec":
        return Data2VecPretrain(cfg)
    if cfg.objective == "wav2vec2":
        return Wav2Vec2Pretrain(cfg)
    return HubertPretrain(cfg, labels)


def save_model(path: str | Path, model: HubertPretrain, state_dict: dict | None = None,
               teacher: dict | None = None, objective_state: dict | None = None) -> None:
    """Write ``model`` as a model file (:func:`model_bytes`)."""
    atomic_write_bytes(path, model_bytes(model, state_dict, teacher, objective_state))


def model_bytes(model: HubertPretrain, state_dict: dict | None = None, teacher: dict | None = None,
                objective_state: dict | None = None) -> bytes:
    """``model`` as the bytes of a model file, its weights in float32 whatever precision it
    trains in; ``state_dict`` replaces the module's own (the gathered weights of a ZeRO 3 run);
    ``teacher`` is a data2vec run's EMA teacher (its state dict), kept beside the model for
    resuming; ``objective_state``, an objective's other state (plain numbers). The same weights give the same bytes (what lets a rerun of an import see that
    its output is already there).

    Builds no module (a fresh one would draw its initialization from the global RNG and shift
    the trainer's dropout stream)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(model.cfg),
        "labels": [dataclasses.asdict(spec) for spec in model.labels],
        "state_dict": {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                       for k, v in state_dict.items()},
    }
    if teacher is not None:
        payload["teacher"] = {k: v.detach().cpu() for k, v in teacher.items()}
    if objective_state is not None:
        payload["objective_state"] = dict(objective_state)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def resolve_model_file(path: str | Path) -> Path:
    """A model file, or a checkpoint directory holding ``model.pt``.

    A model file inside a checkpoint folder is checked against the folder's manifest, whichever
    way it was named (the folder or the file itself): a damaged model must never be probed,
    clustered or trained from."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise PretrainError(f"no model file at {path} (expected a {MODEL_FILE} or a folder holding one)")
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        try:
            expected = json.loads(manifest.read_text())["files"][path.name]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise PretrainError(f"{manifest} is damaged or does not list {path.name}; the checkpoint cannot "
                                "be trusted") from None
        stat = path.stat()
        if _sha256(str(path), stat.st_mtime_ns, stat.st_size) != expected:
            raise PretrainError(f"{path} does not match the sha256 in {manifest}: the model file is damaged")
    return path


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """A file's sha256, computed once per version of it (several stages resolve one model)."""
    return sha256_file(Path(path))


def load_model(path: str | Path, map_location: str = "cpu") -> HubertPretrain:
    path = resolve_model_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise PretrainError(f"{path} is not a readable model file: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PretrainError(f"{path} is not a pretrain model file")
    if payload.get("version") != VERSION:
        raise PretrainError(f"{path}: model file version {payload.get('version')} is not {VERSION}")
    # Through OmegaConf so that a file from an older version with a missing field gets the
    # default and a removed one is an error naming it.
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), payload["model_config"]))
    model = build_model(cfg, [LabelSpec(**spec) for spec in payload["labels"]])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def _saved_beside(path: str | Path, key: str, missing: str):
    """What a model file keeps beside the weights under ``key``; ``missing`` says why it may lack it."""
    path = resolve_model_file(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if key not in payload:
        raise PretrainError(f"{path} holds no {missing}")
    return payload[key]


def load_teacher_state(path: str | Path) -> dict:
    """The EMA teacher saved with a data2vec model file."""
    return _saved_beside(path, "teacher", "data2vec teacher (a HuBERT model, or written by another tool)")


def load_objective_state(path: str | Path) -> dict:
    """The objective's state saved with a model file (``save_model(objective_state=)``)."""
    return _saved_beside(path, "objective_state", "objective state (written by another objective or tool)")
