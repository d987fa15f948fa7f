"""Reading an offline wandb run back: the records of a ``run-<id>.wandb`` file, parsed with the
``wandb`` package's own protobuf (``wandb_internal_pb2.Record``). The file is a LevelDB-style
log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of records, each
with a 7-byte header (CRC-32C, length, type: full, first, middle, last), split across blocks
when long and never started in the last 6 bytes of a block."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (FULL, FIRST):
            pending = payload
        elif kind in (MIDDLE, LAST):
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def run_record(train_dir: Path) -> wandb_internal_pb2.RunRecord:
    """The ``run`` record of a training folder's first offline wandb run: the training's own
    (a resume, or iterate adding the iteration's evaluations, appends later ones)."""
    files = sorted(Path(train_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {train_dir}"
    return next(r.run for r in records(files[0]) if r.WhichOneof("record_type") == "run")


def config_of(run: wandb_internal_pb2.RunRecord) -> dict[str, str]:
    """The run's config, each value as wandb stored it (JSON text)."""
    return {item.key: item.value_json for item in run.config.update}
