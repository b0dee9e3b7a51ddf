"""`RunCheckpoint`: ModelCheckpoint that writes into `<run dir>/checkpoints/` whatever the logger, and keeps
`last.ckpt` the weights of the latest epoch, always.

Lightning's default places checkpoints under the logger's `<save_dir>/<project>/<run id>/`, which for W&B
buries them; one run directory holding config, metrics, results and checkpoints is easier to find, resume
and evaluate (`test --ckpt_path runs/<run>/checkpoints/last.ckpt` evaluates into the same folder).

Lightning's `save_last=True` only copies to `last.ckpt` when a top-k checkpoint is written, that is when the
monitored validation loss improves: with `monitor="val/loss"` it would hold the best-validation epoch, so the
"final" weights tested after fit, and a resume, would silently be those of an earlier epoch. Here `last.ckpt`
is written at the end of every epoch (after its validation), and `best-<epoch>.ckpt` stays the
lowest-validation-loss one.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class RunCheckpoint(ModelCheckpoint):
    """Keeps `last.ckpt` (the latest epoch's weights: what fit tests and what a resume continues from) and
    `best-<epoch>.ckpt` (the lowest validation loss: the early-stopping point of an overfitting curve)."""

    def __init__(
        self, monitor: str = "val/loss", filename: str = "best-{epoch}", save_last: bool = True, **kwargs
    ) -> None:
        # No version counter: `last.ckpt` is overwritten in place. With it, a resumed run whose folder is
        # reached by another path (a symlink) would write `last-v1.ckpt` beside a stale `last.ckpt`.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(monitor=monitor, filename=filename, save_last=save_last, auto_insert_metric_name=False,
                         **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        """Lightning calls this right after a top-k save (an improved validation loss) and at train end; here
        `last.ckpt` is written once per epoch instead, below, so it never lags behind the training."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning runs the epoch's validation before this hook, so the checkpoint holds the epoch's weights
        # and its validation loss, and one place writes it whether or not this epoch validated.
        super().on_train_epoch_end(trainer, pl_module)
        if (self.save_last and not trainer.fast_dev_run and not trainer.sanity_checking
                and trainer.state.fn == TrainerFn.FITTING):
            super()._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Preemption (SIGTERM, e.g. a cluster's time limit): keep the progress of the interrupted epoch in
        # last.ckpt; a resumed run continues at the next batch (see EpochShuffleSampler).
        # Ctrl-C takes the same path (cli.py turns it into Lightning's SIGTERM flag, so it lands between batches).
        if (isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and self.save_last
                and self.dirpath is not None):
            trainer.save_checkpoint(os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION))
