"""Check a shard directory; the same as `pretrain shards verify` (see its --help)."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "verify", *sys.argv[1:]]))
