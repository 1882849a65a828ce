"""Preemption: the signals a cluster sends before it takes a job's machine
(SIGTERM from Slurm's time limit, preemption or `scancel`, a spot instance's
notice; SIGUSR1 from `sbatch --signal`), and the exit code that tells a job
script to requeue.

A stopped job keeps all it finished and exits PREEMPTED_EXIT; rerunning the
same command (with --resume) continues it. labelgen raises `Preempted` in
the main thread, so a generation run stops as it stops on Ctrl-C (the shard
in flight discarded); student-train sets a flag that its loop reads after
each optimizer step, so it can save a checkpoint there first.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75   # EX_TEMPFAIL: stopped cleanly, try again (jobs/ scripts requeue on it)


class Preempted(KeyboardInterrupt):
    """A preemption signal, raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.name = signal.Signals(signum).name


def _raise(signum, frame):
    raise Preempted(signum)


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield   # signals reach the main thread only; nothing to install here
        return
    previous = {s: signal.signal(s, handler) for s in PREEMPT_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def raise_on_preemption():
    """Within the block, a preemption signal raises Preempted."""
    return _handlers(_raise)


class StopFlag:
    """Within `with StopFlag() as flag:`, a preemption signal sets
    `flag.signal` (its name) instead of ending the process."""

    def __init__(self):
        self.signal: str | None = None

    def _set(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        self._cm = _handlers(self._set)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
