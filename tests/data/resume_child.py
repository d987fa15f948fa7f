"""Run in a fresh process by the resume tests: load loader states and print what follows each.

Usage: python resume_child.py CONFIG_JSON STATES_JSON RANK WORLD
STATES_JSON is a file holding a list of ``[state, count]``. For each, a new loader loads the
state; the output is a JSON list with, per state, the list of batch signatures for the rest of
the current epoch plus ``count - 1`` further epochs (epoch mode), or of the next ``count``
batches (infinite mode). One process serves several states (a Python start and torch import
per state would double the tests' time); none of them shares anything with the process that
saved it.
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


def resume(cfg: DataConfig, state: dict, rank: int, world: int, count: int) -> list:
    loader = ShardLoader(cfg, rank=rank, world_size=world)
    loader.load_state_dict(state)
    out = []
    if cfg.infinite:
        for batch in loader:
            out.append(signature(batch))
            if len(out) == count:
                break
    else:
        for _ in range(count):
            out.extend(signature(b) for b in loader)
    return out


def main() -> None:
    overrides, states_path, rank, world = sys.argv[1:5]
    cfg = load_config(DataConfig, [], json.loads(overrides))
    with open(states_path) as f:
        jobs = json.load(f)
    print(json.dumps([resume(cfg, state, int(rank), int(world), int(count)) for state, count in jobs]))


if __name__ == "__main__":
    main()
