"""The preemption signal, SIGUSR1 (SLURM's `--signal=SIGUSR1@90` warning before a time limit, or
`scancel --signal=USR1`), kept away from the processes that must not take it.

SLURM signals every process of a job step, a qreg process's helpers included. A helper that does not handle it
dies of it (SIGUSR1's default action), which breaks its parent: a corruption worker's death fails the split pool.
A helper started with the signal blocked never sees it, and leaves it to its parent, which saves and requeues.
A child qreg process (a study's cell) is started blocked as well, so that a signal arriving before its first line
has installed its handler waits for that handler instead of killing it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

PREEMPTION_SIGNAL = signal.SIGUSR1


class _Noted:
    received = False  # this process was told it is preempted (by its own handler, or a study runner's)


def note_preemption() -> None:
    _Noted.received = True


def preemption_noted() -> bool:
    return _Noted.received


def forget_preemption() -> None:
    _Noted.received = False


def block_preemption() -> None:
    """Block the preemption signal in this thread (a `preexec_fn`: the child inherits the blocked mask)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {PREEMPTION_SIGNAL})


@contextlib.contextmanager
def preemption_blocked() -> Iterator[None]:
    """Processes started inside inherit the blocked signal; this process takes one that came meanwhile at the end
    of the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {PREEMPTION_SIGNAL})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
