"""Small helpers shared by every stage: atomic writes and run provenance."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""What ``open()`` would give a new file: mkstemp's 0600 would lock teammates out of shared
shards and checkpoints."""


class PretrainError(RuntimeError):
    """A problem the user can fix (missing tool, bad input, occupied output); the CLI prints
    its message without a traceback."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def safe_name(name: object, what: str) -> str:
    """``name`` if it is one harmless path component (letters, digits, ``._-``, not starting
    with a dot), else ``PretrainError`` naming ``what``: names from configs and received
    manifests are joined into paths, and ``''``, ``/abs`` or ``a/../../b`` would write elsewhere."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 200:
        raise PretrainError(f"{what}: {name!r} is not a valid name (one path component of letters, digits, "
                            "'.', '_' and '-', not starting with '.')")
    return name


_SECRET_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "pwd"}
_VALUE = r"(\"[^\"]*\"|'[^']*'|[^\s;&|]+)"
_ASSIGNMENT = re.compile(r"(?<![\w.-])(-{0,2}[A-Za-z][A-Za-z0-9_.-]*)(\s*=\s*|:\s+)" + _VALUE)
_OPTION = re.compile(r"(?<![\w.-])(--?[A-Za-z][A-Za-z0-9_.-]*)(\s+)" + _VALUE)
REDACTED = "<redacted>"


def _secret_name(name: str, spaced: bool = False) -> bool:
    parts = set(re.split(r"[_.-]+", name.lower().strip("-")))
    return bool(parts & (_SECRET_PARTS - {"key"} if spaced else _SECRET_PARTS))


def redact(value):
    """``value`` (a string, or lists and dicts of them) with credentials replaced by
    ``<redacted>``: the value of every ``NAME=value``, ``NAME: value`` or ``--NAME value``
    whose name holds key, token, secret or password (``export WANDB_API_KEY=...``), and of
    every dict entry so named. Records (run.json, config.yaml, launch.json, stage records,
    wandb's config) and dry runs go through this; the scripts that must run keep the values."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _secret_name(k) and v not in (None, "") else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        def hide(spaced: bool):
            # "--key 2" (sort's option) is not a credential, "--password x" is
            return lambda m: (f"{m.group(1)}{m.group(2)}{REDACTED}" if _secret_name(m.group(1), spaced)
                              else m.group(0))
        return _OPTION.sub(hide(True), _ASSIGNMENT.sub(hide(False), value))
    return value


def read_lines(path: str | os.PathLike, what: str = "text file") -> list[str]:
    """The lines of a UTF-8 text file the user named; a folder, a missing file or other bytes are
    a ``PretrainError`` naming the path (the CLI's one-line error, not a traceback)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        raise PretrainError(f"{path}: a folder, where a {what} is expected") from None
    except FileNotFoundError:
        raise PretrainError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as e:
        raise PretrainError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                            f"expected a {what}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks (shards, model files, label sidecars)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the new one.

    The temporary file lives in the destination folder because ``os.replace`` is only atomic
    within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
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


def settle_existing(files: dict[Path, bytes], overwrite: bool, hint: str = "") -> bool:
    """Decide what happens to files a command is about to write where the user named: True when
    every one of them already holds exactly these bytes (a rerun with identical inputs: nothing
    to write, nothing touched); False when they may be written (none holds other bytes, or
    ``overwrite``); otherwise ``PretrainError`` naming those that hold something else, so nobody's
    file is replaced unasked."""
    there = [p for p in files if p.exists()]
    differ = [p for p in there if not (p.is_file() and p.read_bytes() == files[p])]
    if len(there) == len(files) and not differ:
        return True
    if differ and not overwrite:
        raise PretrainError(f"{', '.join(map(str, differ))} already exist{'s' if len(differ) == 1 else ''} with other "
                            f"content; set overwrite=true to replace {'it' if len(differ) == 1 else 'them'}"
                            + (f", {hint}" if hint else ""))
    return False
