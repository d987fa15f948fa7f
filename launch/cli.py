"""``launch local --nproc N [--port P] COMMAND ...``: run a ``pretrain`` command in N processes
on this machine with torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, read
by ``pretrain.distributed.read_env``). ``COMMAND`` is ``pretrain train ...``."""

from __future__ import annotations

import argparse
import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    local = modes.add_parser("local", help="N processes on this machine (torchrun)")
    local.add_argument("--nproc", type=int, default=1, help="processes (one per GPU on a GPU machine)")
    local.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    local.add_argument("command", nargs=argparse.REMAINDER, help="pretrain COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[:1] != ["pretrain"] or len(command) < 2:
        parser.error("the command must start with 'pretrain', e.g. launch local --nproc 2 pretrain train ...")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(args.port or free_port()),
                "-m", "pretrain.cli", *command[1:]]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    os.execvpe(torchrun[0], torchrun, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
