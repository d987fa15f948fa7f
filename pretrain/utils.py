"""Small helpers shared by every stage: atomic writes and run provenance."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class PretrainError(RuntimeError):
    """A problem the user can fix (missing tool, bad input, occupied output); the CLI prints
    its message without a traceback."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the new one.

    The temporary file lives in the destination folder because ``os.replace`` is only atomic
    within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_savefig(fig, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG under a temporary name, rename it, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
