"""SIGUSR1, SLURM's preemption signal (`--signal=SIGUSR1@90` before a time limit, `scancel --signal=USR1`), is
qreg's from a command's first line to its last.

Lightning handles it only while a trainer runs (it saves `hpc_ckpt_*.ckpt` inside the signal handler, mid-step,
and requeues at once), so a signal during start-up, set-up, between fit and test or while the corrupted splits
are made killed the process (exit 138) and nothing requeued the job. qreg's handler, installed first of all (and
so keeping Lightning from installing its own):

- during a fit, stops it the way SIGTERM does: at the next batch boundary (held until an epoch's validation has
  ended), where `last.ckpt` is saved;
- anywhere else, ends the command at once (`Preempted`): there is nothing to save, every file is written
  atomically, and the requeued job redoes that stretch;
- when the command has ended, and this process owns the job (not a study's cell, which its runner waits for;
  not a DDP rank other than 0), ends the W&B run and asks SLURM to requeue the job. Only then does SLURM's SIGTERM
  come, to processes that have nothing left to lose: wandb-core no longer runs.

Outside SLURM the same signal stops a fit the same way (a study runner forwards it to its cell) and nothing is
requeued. The exit status is 138 (128 + SIGUSR1).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

from app.signals import watched
from records.preemption import PREEMPTION_SIGNAL, forget_preemption, note_preemption, preemption_noted

OWNER = "QREG_PREEMPTION_OWNER"  # "<job>:<pid>" of the job's first qreg process: the one that requeues


class Preempted(BaseException):  # noqa: N818 - a stop, like KeyboardInterrupt, not an error
    """SIGUSR1 outside a running fit: the command ends where it is."""


def _fitting(trainer) -> bool:
    from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

    return trainer is not None and trainer.state.status == TrainerStatus.RUNNING and trainer.state.fn == \
        TrainerFn.FITTING


def _on_preemption(_number, _frame) -> None:
    first = not preemption_noted()
    note_preemption()
    trainer = watched()
    if _fitting(trainer):
        trainer._signal_connector.received_sigterm = True
        if first:
            print("qreg: SIGUSR1 (preemption): stopping after this batch and saving last.ckpt", file=sys.stderr,
                  flush=True)
        return
    if first:
        raise Preempted


def under_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def _owner() -> str:
    return f"{os.environ.get('SLURM_JOB_ID', '')}:{os.getpid()}"


def _claim_job() -> None:
    """The first qreg process of a job owns it; its children (a study's cells) inherit the claim. A claim from
    another job (an environment passed on by sbatch) does not count."""
    claimed = os.environ.get(OWNER, "")
    if claimed.split(":")[0] != os.environ.get("SLURM_JOB_ID", ""):
        os.environ[OWNER] = _owner()


def _owns_job() -> bool:
    return os.environ.get(OWNER) == _owner() and os.environ.get("SLURM_PROCID", "0") == "0"


def job_to_requeue() -> str:
    """This job as `scontrol requeue` names it: `<array job>_<task>` for an array task."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}" if array else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


def _end_wandb() -> None:
    """End the W&B run (and stop wandb-core) before SLURM's SIGTERM can reach it mid-write."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    with contextlib.suppress(Exception):
        if wandb.run is not None:
            wandb.finish()
    with contextlib.suppress(Exception):
        wandb.teardown()


def requeue() -> None:
    """Ask SLURM to requeue this job, once its progress is saved and its W&B run ended."""
    # SLURM answers a requeue with SIGTERM to the job's processes: this one has finished its work.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = job_to_requeue()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"qreg: could not requeue SLURM job {job} ({error}); resubmit it to resume", file=sys.stderr)
        return
    if done.returncode == 0:
        print(f"qreg: requeued SLURM job {job}; it resumes from its last checkpoint", file=sys.stderr, flush=True)
    else:
        print(f"qreg: could not requeue SLURM job {job} ({done.stderr.strip() or done.returncode}); resubmit it "
              "to resume", file=sys.stderr, flush=True)


@contextlib.contextmanager
def owning_preemption() -> Iterator[None]:
    """Own SIGUSR1 for one command; requeue the job after it when a preemption came and this process owns it."""
    forget_preemption()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    _claim_job()
    previous = signal.signal(PREEMPTION_SIGNAL, _on_preemption)
    # A study starts its cells with the signal blocked, so that one sent before this line waits for it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {PREEMPTION_SIGNAL})
    try:
        yield
    finally:
        signal.signal(PREEMPTION_SIGNAL, previous)
        if under_slurm():
            # Ended here rather than by wandb's exit hook, which prints a traceback when SLURM's SIGTERM (a
            # requeue, a time limit) has already stopped wandb-core; the requeued job resumes the same run id.
            _end_wandb()
        if preemption_noted() and under_slurm() and _owns_job():
            requeue()
