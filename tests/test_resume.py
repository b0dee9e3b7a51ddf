"""Exact resume: a run stopped by SIGTERM mid-epoch, or SIGKILLed after its last checkpoint, and resumed ends
with bitwise the same weights (fake-quant state included) and the same per-epoch metrics as an uninterrupted run.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from resume_helpers import BATCHES, EPOCHS, assert_same_run, epoch_metrics, epochs_written, finish, start, wait_until


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run both interruptions are compared with."""
    run = tmp_path_factory.mktemp("resume") / "uninterrupted"
    finish(start(run))
    assert sorted(epoch_metrics(run)) == list(range(EPOCHS))
    return run


def test_sigterm_mid_epoch_resumes_exactly(reference, tmp_path):
    """SIGTERM in the middle of epoch 1: Lightning stops after the current batch, qreg saves last.ckpt there."""
    stopped = tmp_path / "sigterm"
    process = start(stopped)
    wait_until(lambda: epochs_written(stopped) >= 1)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    finish(process, expected=143)
    checkpoint = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] % BATCHES != 0, "the SIGTERM did not land mid-epoch"
    finish(start(stopped, "--ckpt_path", str(stopped / "checkpoints" / "last.ckpt")))
    assert_same_run(stopped, reference)


@pytest.mark.slow  # the easier case (an end-of-epoch checkpoint); the fast suite resumes after SIGKILL in test_study
def test_sigkill_after_a_checkpoint_resumes_exactly(reference, tmp_path):
    """SIGKILL during epoch 1: nothing is saved; the run resumes from the end-of-epoch-0 checkpoint."""
    killed = tmp_path / "sigkill"
    process = start(killed)
    wait_until(lambda: epochs_written(killed) >= 1 and (killed / "checkpoints" / "last.ckpt").exists())
    time.sleep(0.5)
    process.kill()
    process.wait()
    finish(start(killed, "--ckpt_path", str(killed / "checkpoints" / "last.ckpt")))
    assert_same_run(killed, reference)
