"""A SIGTERM during an epoch's end-of-epoch validation: the resumed run still writes that epoch's metrics row
with its validation loss and accuracy (a gap in Figure 1 otherwise)."""

from __future__ import annotations

import os
import signal

import lightning as L

from conftest import run_cli
from records.run_files import read_epoch_metrics

EPOCHS, STOP_EPOCH = 3, 1


class SigtermDuringValidation(L.Callback):
    """Sends SIGTERM to this process in the middle of epoch `STOP_EPOCH`'s validation (the first run only)."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if (not trainer.sanity_checking and trainer.current_epoch == STOP_EPOCH and batch_idx == 0
                and not os.environ.get("QREG_TEST_RESUMED")):
            os.kill(os.getpid(), signal.SIGTERM)


def rows(run_dir) -> dict[int, dict]:
    return {row["epoch"]: row for row in read_epoch_metrics(run_dir / "metrics.jsonl")}


def test_sigterm_during_validation_keeps_the_epochs_record(digits_fast_args, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*digits_fast_args, "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_val_batches", "3",
            "--data.init_args.eval_batch_size", "16", "--test_after_fit", "false"]
    monkeypatch.delenv("QREG_TEST_RESUMED", raising=False)
    assert run_cli("fit", *args, "--trainer.callbacks+=test_interrupted_epoch.SigtermDuringValidation") == 143
    assert sorted(rows(run_dir)) == list(range(STOP_EPOCH + 1))  # stopped in that epoch, its record kept
    monkeypatch.setenv("QREG_TEST_RESUMED", "1")
    assert run_cli("fit", *args, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")) == 0
    by_epoch = rows(run_dir)
    assert sorted(by_epoch) == list(range(EPOCHS))
    for epoch, row in by_epoch.items():
        assert {"val/loss", "val/acc", "train/loss"} <= set(row), (epoch, row)
