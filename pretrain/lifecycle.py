"""A process's life around its work: the signals that stop it, dying with its launcher, and the
lock that keeps one run directory to one run.

Imports nothing heavy: ``install_early`` runs at the top of ``pretrain.cli``, before torch,
DeepSpeed or the data stack are imported (about 2 s on this machine), because a preemption
signal can arrive in that window, right after a requeued job restarts.

Signals (training only). SIGUSR1 is SLURM's advance warning (``--signal=USR1@T``) and SIGTERM
what ``scontrol requeue``, ``scancel`` and a site's preemption send before SIGKILL (after
``KillWait``, 30 s by default). Both are only *recorded* here; the trainer checkpoints at the
next step boundary, all ranks together (``pretrain.train.loop``). After USR1 it requeues the job
itself; after TERM whoever sent it has already decided what happens next, so it just exits. A
second TERM ends the process at once (a stuck step must not make it unkillable). Under torchrun
(``launch local``) SIGTERM keeps its default: there it is torchrun tearing the group down after
a worker failed, when the surviving ranks wait in a collective that cannot complete (SIGUSR1
to the workers checkpoints and stops a local run).

Parent death. torchrun starts each worker in a session of its own, so killing the launcher with
SIGKILL (the OOM killer, ``kill -9``, a lost terminal) used to leave the workers training and
writing checkpoints. ``launch local`` puts its pid in ``PRETRAIN_LAUNCHER_PID``; a worker asks
the kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks that
the parent is still that launcher (it may have died before the request).

Failing fast. A training process that meets any error ends at once (``fail_fast``): the error,
with the rank, is the last thing it prints; its data workers and background probes are killed
(a data worker ignores SIGTERM, and at a normal exit Python would wait for it forever); the run
lock goes with the process. The launcher (torchrun, ``srun --kill-on-bad-exit``) then stops the
other ranks, which would otherwise wait in a collective. ``StallWatchdog`` does the same for a
process whose training steps stop completing without an error: it writes every thread's
Python stack to the run directory first.

The run lock. ``RunLock`` is an exclusive ``flock`` on ``<dir>/.lock`` whose content names the
holder (host, pid, SLURM job, command, start time). A second training or ``iterate`` in the same
directory is refused with the holder's name. The kernel drops the lock when its holder dies, so
a lock file whose holder is gone is stale: it is taken over, with a warning naming the old
holder. (On NFS, flock is forwarded to the server as a POSIX lock by Linux clients.)
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, NoReturn

from pretrain.utils import PretrainError

log = logging.getLogger(__name__)

LAUNCHER_ENV = "PRETRAIN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


class Stop:
    """Signals recorded since ``install_early`` (or ``Stop.install``): ``usr1`` and ``term``."""

    usr1 = False
    term = False
    _installed = False
    _previous: dict = {}

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        cls._previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, cls._on_usr1)}
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            # Under torchrun (`launch local`) SIGTERM is torchrun's teardown after a worker
            # failed: the other ranks are then stuck in a collective and could never reach a
            # step boundary, so the default (end at once) stays. SLURM's srun tasks and plain
            # processes checkpoint first.
            cls._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, cls._on_term)
        cls._installed = True

    @classmethod
    def restore(cls) -> None:
        for signum, handler in cls._previous.items():
            signal.signal(signum, handler)
        cls._installed = False
        cls.usr1 = cls.term = False

    @classmethod
    def _on_usr1(cls, signum, frame) -> None:
        if not cls.usr1:
            log.warning("preemption signal (SIGUSR1): checkpointing at the next step boundary")
        cls.usr1 = True

    @classmethod
    def _on_term(cls, signum, frame) -> None:
        if cls.term:  # the second one: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("SIGTERM: checkpointing at the next step boundary, then exiting (a second SIGTERM "
                    "ends the process at once)")
        cls.term = True


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL this process when its parent dies (Linux); exits at once if the parent is
    already not ``expected_parent``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        sys.stderr.write(f"pretrain: the launcher (pid {expected_parent}) is gone; exiting\n")
        os._exit(1)


def install_early(argv: list[str]) -> None:
    """What must happen before the heavy imports (see the module docstring)."""
    if "DS_ACCELERATOR" not in os.environ and not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()):
        # DeepSpeed's own choice on a machine without NVIDIA's driver, made without the warning
        # it prints on every import when it has to guess.
        os.environ["DS_ACCELERATOR"] = "cpu"
    # Popped: it names this process's parent, not that of the processes it starts (a trainer's
    # background probes).
    launcher = os.environ.pop(LAUNCHER_ENV, None)
    if launcher:
        die_with_parent(int(launcher))
    words = [a for a in argv if not a.startswith("-")]
    only = argv[argv.index("--only") + 1] if "--only" in argv[:-1] else ""
    # Training, directly or as an iterate stage run in this process (a SLURM job).
    if words[:1] == ["train"] or (words[:1] == ["iterate"] and only.endswith(".train")):
        Stop.install()
        # A SLURM training task starts with SIGUSR1 blocked (launch.slurm.HOLD_USR1): one that
        # came during start-up is pending and reaches the handler now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


# --------------------------------------------------------------------------- failing fast

_on_abort: list[Callable[[], None]] = []


def on_abort(callback: Callable[[], None]) -> None:
    """Run ``callback`` (stop a child process of ours) if this process fails fast."""
    _on_abort.append(callback)


def _message(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    text = str(error)
    if "\nOriginal Traceback" in text:
        # Re-raised by the DataLoader from a data worker: the worker's own last line.
        last = text.strip().splitlines()[-1]
        return f"{type(error).__name__}: {last.split(': ', 1)[1] if ': ' in last else last}"
    return f"{type(error).__name__}: {text}"


def peer_lost(error: BaseException | str) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone (gloo, NCCL or
    torch.distributed's own errors): the consequence of a failure elsewhere, not its cause."""
    if isinstance(error, str):
        return False
    name = type(error).__name__
    text = str(error)
    return name.startswith("Dist") or "gloo/transport" in text or "NCCL" in text or "ProcessGroup" in text


def fail_fast(prog: str, rank: int, error: BaseException | str, code: int = 1) -> NoReturn:
    """End this process now, with exit status ``code``, after ``error``.

    The error is printed last, naming the rank: one line for an error the user can fix
    (``PretrainError``), for a peer that is gone, and for a data worker's error; the traceback
    before it for anything else. Under torchrun it is also written to the worker's error file,
    from which ``launch local`` repeats the first cause as the job's last line. Children are
    killed, not asked: a DataLoader worker ignores SIGTERM (SLURM signals every process of a
    task), and what Python does at a normal exit (join every child) would then never end.
    """
    message, lost = _message(error), peer_lost(error)
    if lost:
        message = f"lost contact with another rank, which probably failed first ({message})"
    elif isinstance(error, BaseException) and not isinstance(error, (PretrainError, FileExistsError,
                                                                     FileNotFoundError)):
        traceback.print_exception(error, file=sys.stderr)
    for callback in list(_on_abort):
        try:
            callback()
        except Exception:  # noqa: BLE001 - nothing may keep this process alive
            pass
    for child in multiprocessing.active_children():
        child.kill()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            # torchrun's error-file format, plus what launch.elastic needs to name the cause.
            # Under a temporary name, then renamed: when every rank fails at once, the agent
            # kills the others as soon as the first exits, and it reads each rank's file; a
            # half-written one made torchrun itself die on a JSONDecodeError.
            tmp = f"{error_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time()),
                           "pretrain": {"time": time.time(), "peer_lost": lost}}, f)
            os.replace(tmp, error_file)
        except OSError:
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: error on rank {rank}: {message}\n")
    sys.stderr.flush()
    os._exit(code)


class StallWatchdog:
    """Ends a process whose training steps stop completing (``train.stall_timeout``).

    ``beat()`` after every step. If none comes within the limit (``startup`` until the first
    beat: process group, checkpoint loading, compiling and the first batch take longer than a
    step), the stacks of every Python thread are written to ``run_dir/stacks/rank_R.txt``
    (faulthandler, which needs no cooperation from the stuck thread) and the process fails
    fast. Every rank runs one, so a wedged rank and the ranks waiting for it all leave their
    stacks. A limit of 0 turns it off."""

    def __init__(self, run_dir: Path, rank: int, stall: float, startup: float, prog: str = "pretrain train"):
        self.path = Path(run_dir) / "stacks" / f"rank_{rank}.txt"
        self.rank, self.stall, self.startup, self.prog = rank, stall, startup, prog
        self._last = time.monotonic()
        self._stepped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StallWatchdog":
        if self.stall > 0 or self.startup > 0:
            self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()
        self._stepped = True

    @property
    def _limit(self) -> float:
        return self.stall if self._stepped else self.startup

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            waited = time.monotonic() - self._last
            if self._limit > 0 and waited > self._limit:
                self._fire(waited)
            self._stop.wait(min(5.0, max(self._limit - waited, 0.1)) if self._limit > 0 else 5.0)

    def _fire(self, waited: float) -> None:
        what, field = (("no training step completed", "stall_timeout") if self._stepped else
                       ("the first training step did not complete", "startup_timeout"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"{what} in {waited:.0f} s (train.{field}={self._limit:g}); the stacks of every thread of "
                    f"rank {self.rank} (pid {os.getpid()}, host {socket.gethostname()}):\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        fail_fast(self.prog, self.rank, f"{what} in {waited:.0f} s (train.{field}={self._limit:g}); "
                  f"the Python stacks of every thread are in {self.path}", code=3)


# --------------------------------------------------------------------------- the run lock


class RunLockError(PretrainError):
    """The run directory is held by another run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, held until the process exits (or ``release``)."""

    def __init__(self, folder: str | Path, what: str):
        self.path = Path(folder) / ".lock"
        self.what = what
        self._fd: int | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    @staticmethod
    def describe(holder: dict | None) -> str:
        if not holder:
            return "an unknown process"
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return (f"{holder.get('what', 'a run')} (pid {holder.get('pid')} on host {holder.get('host')}{job}, "
                f"since {holder.get('since')}: {holder.get('command')})")

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockError(f"{self.path.parent} is in use by {self.describe(self.holder())}; two runs in "
                               "one directory would delete each other's checkpoints. Wait for it, stop it, or "
                               "use another directory") from None
        old = self.holder()
        if old and old.get("pid"):
            here = old.get("host") == socket.gethostname()
            state = "not running" if here and not _alive(int(old["pid"])) else "no longer holding it"
            log.warning("stale lock %s from %s (%s): taken over", self.path, self.describe(old), state)
        holder = {"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                  "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def held_by(self) -> dict | None:
        """The holder if a live process holds the lock (probed with a shared lock, not taken)."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder() or {"pid": None}
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        """Give the lock up (the file stays, empty, so a later holder sees no stale entry)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
