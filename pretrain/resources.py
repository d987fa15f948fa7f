"""Files that ship with pretrain besides its code: ``configs/`` and the sbatch templates and
local cluster script in ``slurm/``. In a source checkout they are the top-level folders; an
installed package (``pip install .``) carries copies in ``pretrain/_shipped/`` (setup.py).
Commands find them either way, so ``--config configs/demo.yaml`` works from any directory.
Files only the library reads live inside the package itself (``pretrain/reference_curves.json``,
package data in setup.cfg)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
_SHIPPED = _PACKAGE / "_shipped"


def resource(name: str) -> Path:
    """``configs`` or ``slurm``: the checkout's own when this package runs from one, else the
    installed copy."""
    checkout = _CHECKOUT / name
    if checkout.exists() and (_CHECKOUT / "setup.cfg").is_file():
        return checkout
    return _SHIPPED / name


def config_path(path: str | Path) -> Path:
    """``path`` as given when it exists; else, for a path under ``configs/`` (the shipped
    configs), the shipped file; else ``path`` unchanged (the caller reports it missing)."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    shipped = resource("configs").joinpath(*path.parts[1:])
    return shipped if shipped.exists() else path
