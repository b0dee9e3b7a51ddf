"""Ctrl-C during a fit or test stops it the way SIGTERM does: at the next batch boundary, where Lightning raises
SIGTERMException and qreg saves a consistent `last.ckpt` (a KeyboardInterrupt could land inside an optimizer
step). A second Ctrl-C, or one outside a running trainer, interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class _State:
    trainer = None  # the running Trainer, once built
    received = False  # a Ctrl-C asked the trainer to stop


def watch(trainer) -> None:
    """Let a Ctrl-C (or a preemption, app/preemption.py) stop this trainer at its next batch."""
    _State.trainer = trainer


def watched():
    """The running command's trainer, once built (None before and after)."""
    return _State.trainer


def ctrl_c_received() -> bool:
    return _State.received


def _on_ctrl_c(_number, _frame) -> None:
    from lightning.pytorch.trainer.states import TrainerStatus

    trainer = _State.trainer
    if _State.received or trainer is None or trainer.state.status != TrainerStatus.RUNNING:
        raise KeyboardInterrupt
    _State.received = True
    trainer._signal_connector.received_sigterm = True
    print("\nqreg: Ctrl-C: stopping after this batch and saving last.ckpt (press again to stop at once)",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def handling_ctrl_c() -> Iterator[None]:
    """Own SIGINT for one command (only the main thread may set handlers; a command run from another thread, as
    some tests do, keeps Python's default)."""
    _State.trainer, _State.received = None, False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_ctrl_c) if in_main_thread else None
    try:
        yield
    finally:
        _State.trainer = None
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
