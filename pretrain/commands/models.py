"""``pretrain export hf``, ``pretrain import hf`` and ``pretrain import fairseq``."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config.export import ExportHfConfig
from pretrain.config.imports import ImportFairseqConfig, ImportHfConfig
from pretrain.model.checkpoint import model_bytes
from pretrain.model.export import export_hf
from pretrain.model.imports import import_fairseq, import_hf
from pretrain.utils import PretrainError, atomic_write_bytes, settle_existing


def export(cfg: ExportHfConfig, argv: list[str], progress: bool) -> int:
    wrote = export_hf(cfg.checkpoint, cfg.out, cfg.overwrite)
    # The class the folder's config.json names: what transformers builds from it.
    name = json.loads((Path(cfg.out) / "config.json").read_text())["architectures"][0]
    print(f"{'wrote' if wrote else 'already there, nothing written:'} a transformers.{name} in {cfg.out}; load it "
          f"with transformers.{name}.from_pretrained('{cfg.out}') (or AutoModel)")
    return 0


def import_model(cfg: ImportHfConfig | ImportFairseqConfig, argv: list[str], progress: bool) -> int:
    out = Path(cfg.out)
    # Checked before the import: what no import may ever replace.
    if out.is_dir():
        raise PretrainError(f"{out} is a folder; name the model file to write (e.g. {out / 'model.pt'})")
    if (out.parent / "manifest.json").is_file():
        raise PretrainError(f"{out.parent} is a checkpoint folder (it has a manifest.json); writing {out.name} there "
                            "would replace its model and break the manifest: choose another out")
    notes: list[str] = []
    model = import_fairseq(cfg.source, notes) if isinstance(cfg, ImportFairseqConfig) else import_hf(cfg.source)
    for note in notes:
        print(note)
    data = model_bytes(model)
    c = model.cfg
    # After the import, not before: a rerun whose output is already there is no error.
    if settle_existing({out: data}, cfg.overwrite):
        print(f"{cfg.out} already holds this model ({c.arch}, {c.encoder_layers} layers): nothing written")
        return 0
    atomic_write_bytes(out, data)
    print(f"wrote {cfg.out}: a {c.arch} backbone, {c.encoder_layers} layers x {c.encoder_embed_dim} dims "
          f"(no label sets: use it for `features model`, `probe` or `train init_from=`)")
    return 0
