"""Run in a fresh process by the resume tests: load a loader state and print what follows.

Usage: python resume_child.py CONFIG_JSON STATE_JSON RANK WORLD EPOCHS
Prints a JSON list of batch signatures for the rest of the current epoch plus EPOCHS - 1
further epochs (epoch mode), or of the next EPOCHS batches (infinite mode).
"""

from __future__ import annotations

import json
import sys

from pretrain.config import load_config
from pretrain.config.data import DataConfig
from pretrain.data.pipeline import ShardLoader


def signature(batch) -> list:
    return [[k, int(n), round(float(a.abs().sum()), 3)]
            for k, n, a in zip(batch["keys"], batch["lengths"], batch["audio"])]


def main() -> None:
    overrides, state_path, rank, world, count = sys.argv[1:6]
    cfg = load_config(DataConfig, [], json.loads(overrides))
    loader = ShardLoader(cfg, rank=int(rank), world_size=int(world))
    with open(state_path) as f:
        loader.load_state_dict(json.load(f))
    out = []
    if cfg.infinite:
        for batch in loader:
            out.append(signature(batch))
            if len(out) == int(count):
                break
    else:
        for _ in range(int(count)):
            out.extend(signature(b) for b in loader)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
