"""The ``pretrain`` command's entry point. The stages, their configs and the parser live in
``pretrain.stages``; this module only makes sure the process is set up before any of them is
imported (``pretrain.lifecycle``)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pretrain.lifecycle import install_early

    install_early(argv)  # before any heavy import: see pretrain.lifecycle
    from pretrain.stages import execute

    return execute(argv)


if __name__ == "__main__":
    sys.exit(main())
