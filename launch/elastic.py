"""torchrun for ``launch local``, ending with the failing rank's own error.

torchrun stops every worker once one fails, then raises ``ChildFailedError``, whose report is
a box of its own with a link to its documentation. Here the report is one line naming the
first rank that failed, its exit status and its error (which ``pretrain.lifecycle.fail_fast``
wrote to the worker's error file), so that what went wrong is the job's last line.
"""

from __future__ import annotations

import sys


def _order(rank: int, failure) -> tuple:
    """The cause first: a rank that reported its own error (``pretrain.lifecycle.fail_fast``)
    before one that lost its peers, both before a rank torchrun stopped with a signal or that
    died without a word; then the earliest."""
    ours = failure.error_file_data.get("pretrain") if isinstance(failure.error_file_data, dict) else None
    if not ours:
        return (2, failure.timestamp, rank)
    return (int(bool(ours.get("peer_lost"))), ours.get("time", failure.timestamp), rank)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda item: _order(*item))
        said = failure.message if failure.error_file_data.get("message") else "see its output above"
        if failure.exitcode < 0:
            said = f"killed by {failure.signal_name()}"
        others = len(e.failures) - 1
        also = f" ({others} other rank{'s' if others > 1 else ''} stopped after it)" if others else ""
        sys.stderr.write(f"launch local: the job failed: rank {rank} (exit status {failure.exitcode}): {said}{also}\n")
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
