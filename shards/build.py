"""corpus -> WebDataset shards; the same as `pretrain shards build` (see its --help)."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
