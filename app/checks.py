"""The checks a run passes before anything is written: it trains something, in a precision qreg computes in."""

from __future__ import annotations

from typing import Any

from datamodules.base import ImageClassificationDataModule, batches_per_epoch
from lightning_modules.task import OptionError
from user_errors import UserError

# The precisions every method trains and tests in: float32, or mixed precision (autocast; the quantizers still
# compute in float32). A "-true" half or double precision casts the network but not the batches the DataModules
# normalise (float32) nor the quantizers' float32 arithmetic: it would fail on the first batch, after the run
# folder was made. Lightning's aliases: 32 -> 32-true, 16 -> 16-mixed, bf16 -> bf16-mixed.
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


class NothingToTrain(UserError):
    """A fit that would train nothing: its test rows would look like a trained run's."""


class TrainerOptionError(UserError):
    """Trainer options Lightning refuses (e.g. --trainer.accelerator gpu on a machine without one)."""


def check_training_length(trainer: Any) -> None:
    """Refuse a fit that would train nothing: its test rows would look like a trained run's (and a study
    would count the cell as finished)."""
    for option in ("max_epochs", "max_steps"):
        if trainer.get(option) == 0:
            raise NothingToTrain(f"--trainer.{option} 0 trains nothing; give at least 1 (or -1 for no limit)")
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and limit <= 0:
        raise NothingToTrain(f"--trainer.limit_train_batches {limit} trains nothing; give at least 1 batch")


def check_training_batches(datamodule: Any, trainer: Any) -> None:
    """Refuse a training set that gives no batch per epoch (smaller than one batch, with drop_last)."""
    if datamodule is None or not hasattr(datamodule, "batch_size"):
        return
    datamodule.setup("fit")  # idempotent: Lightning's own call reuses the split
    train_set = getattr(datamodule, "train_set", None)
    if train_set is None:
        return
    images = len(train_set) // max(1, trainer.world_size)
    drop_last = isinstance(datamodule, ImageClassificationDataModule)  # its training batches are all full
    if batches_per_epoch(images, datamodule.batch_size, drop_last, trainer.limit_train_batches) == 0:
        ranks = f" per process ({trainer.world_size} processes)" if trainer.world_size > 1 else ""
        raise NothingToTrain(
            f"{images} training images{ranks} make no full batch of data.init_args.batch_size "
            f"{datamodule.batch_size} (incomplete batches are dropped): no training step would run; "
            "lower the batch size or give more data")


def check_precision(trainer: Any) -> None:
    """Refuse, before anything is written, a precision qreg does not compute in (64-true, 16-true, ...)."""
    precision = trainer.get("precision")
    if precision is not None and PRECISION_ALIASES.get(str(precision), str(precision)) not in SUPPORTED_PRECISIONS:
        raise OptionError(f"--trainer.precision {precision} is not supported; qreg computes in "
                          f"{', '.join(SUPPORTED_PRECISIONS[:-1])} or {SUPPORTED_PRECISIONS[-1]} (16-mixed on a GPU "
                          "only), every method alike")
