"""Job launching.

``launch local --nproc N [--port P] COMMAND ...``: run a ``pretrain`` command in N processes
on this machine with torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, read
by ``pretrain.distributed.read_env``). ``COMMAND`` is ``pretrain train ...``.

Several machines without SLURM: run the same command on each, with ``--nnodes N --node-rank R
--master-addr HOST --master-port P`` (node 0's address and a port free there; torchrun's static
rendezvous, then NCCL or gloo over TCP). Ranks are ``R * nproc + local rank``, so node 0 holds
rank 0 (the run lock, checkpoints' shared files, logging). The run directory must be on a file
system every node sees, as under SLURM.

``launch slurm [--profile P] [--dry-run] [--after ID] COMMAND ...``: render the stage's sbatch
script from ``slurm/`` and the cluster profile, and submit it (see ``launch/slurm.py``);
``--stage "COMMAND" --stage "COMMAND" ...`` submits a chain, each after the previous succeeds.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from pretrain import __version__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"launch (pretrain {__version__})")
    modes = parser.add_subparsers(dest="mode", required=True)
    local = modes.add_parser("local", help="N processes on this machine (torchrun)")
    local.add_argument("--nproc", type=int, default=1, help="processes (one per GPU on a GPU machine)")
    local.add_argument("--nnodes", type=int, default=1, help="machines taking part (each runs this command)")
    local.add_argument("--node-rank", type=int, default=0, help="this machine's place, 0 .. nnodes-1")
    local.add_argument("--master-addr", default=None,
                       help="node 0's address, reachable from every node (default 127.0.0.1 on one node)")
    local.add_argument("--master-port", "--port", dest="port", type=int, default=0,
                       help="rendezvous port on node 0 (0: a free one; several nodes must name one)")
    local.add_argument("command", nargs=argparse.REMAINDER, help="pretrain COMMAND ...")
    slurm = modes.add_parser("slurm", help="submit a stage (or a chain of stages) to SLURM")
    slurm.add_argument("--profile", help="cluster profile YAML (configs/cluster/*.yaml)")
    slurm.add_argument("--set", dest="profile_overrides", action="append", metavar="KEY=VALUE",
                       help="override a profile field, e.g. --set nodes=2 (repeatable)")
    slurm.add_argument("--job-dir", help="where the script, config snapshot and logs go "
                                         "(default: a slurm/ folder in the stage's output)")
    slurm.add_argument("--after", action="append", metavar="JOBID",
                       help="start only after this job succeeded (afterok; repeatable)")
    slurm.add_argument("--tasks", type=int, help="array tasks of features / assign (default: the profile's)")
    slurm.add_argument("--stage", action="append", metavar="'COMMAND'",
                       help="a quoted pretrain command; repeat for a chain run in order")
    slurm.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    slurm.add_argument("command", nargs=argparse.REMAINDER, help="[pretrain] STAGE [--config F] [key=value ...]")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.mode == "slurm":
        from launch import slurm as slurm_launch
        from pretrain.config import ConfigError
        from pretrain.utils import PretrainError

        args.command, args.raw = command, argv[1:]
        if args.stage and command:
            parser.error("give either a command or --stage options, not both")
        try:
            return slurm_launch.main(args)
        except (ConfigError, PretrainError) as e:
            print(f"launch slurm: error: {e}", file=sys.stderr)
            return 2 if isinstance(e, ConfigError) else 1
    if command[:1] != ["pretrain"] or len(command) < 2:
        parser.error("the command must start with 'pretrain', e.g. launch local --nproc 2 pretrain train ...")
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank must be in 0..{args.nnodes - 1} (--nnodes {args.nnodes}), not {args.node_rank}")
    if args.nnodes > 1 and (not args.port or not args.master_addr):
        # A free port picked here is free on this machine only, and the other nodes could not
        # know it; 127.0.0.1 would make each node its own master.
        parser.error("with --nnodes > 1 give --master-addr (node 0's address) and --master-port, "
                     "the same on every node")
    # One check of the whole config before any worker starts: an error is then one line, not
    # the same error from every rank followed by torchrun's report.
    from pretrain.config import ConfigError
    from pretrain.stages import resolve

    try:
        resolve(command[1:])
    except ConfigError as e:
        print(f"{e.prog}: config error: {e}", file=sys.stderr)
        return 2
    torchrun = [sys.executable, "-m", "launch.elastic", "--nproc_per_node", str(args.nproc),
                "--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
                "--master_addr", args.master_addr or "127.0.0.1", "--master_port", str(args.port or free_port()),
                "-m", "pretrain.cli", *command[1:]]
    from pretrain.lifecycle import LAUNCHER_ENV, die_with_parent

    if os.environ.get(LAUNCHER_ENV):  # started by `pretrain iterate`: die with it
        die_with_parent(int(os.environ[LAUNCHER_ENV]))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # exec keeps this pid: torchrun is the workers' parent, and they die with it (a SIGKILLed
    # launcher must not leave them training; see pretrain.lifecycle).
    env[LAUNCHER_ENV] = str(os.getpid())
    os.execvpe(torchrun[0], torchrun, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
