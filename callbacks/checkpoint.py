"""`RunCheckpoint`: ModelCheckpoint that writes into `<run dir>/checkpoints/` whatever the logger.

Lightning's default places checkpoints under the logger's `<save_dir>/<project>/<run id>/`, which for W&B
buries them; one run directory holding config, metrics, results and checkpoints is easier to find, resume
and evaluate (`test --ckpt_path runs/<run>/checkpoints/last.ckpt` evaluates into the same folder).
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class RunCheckpoint(ModelCheckpoint):
    """Keeps `last.ckpt` (the final model, what `test` evaluates by default) and the checkpoint with the lowest
    validation loss (the early-stopping point of an overfitting curve)."""

    def __init__(
        self, monitor: str = "val/loss", filename: str = "best-{epoch}", save_last: bool = True, **kwargs
    ) -> None:
        super().__init__(monitor=monitor, filename=filename, save_last=save_last, auto_insert_metric_name=False,
                         **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Preemption (SIGTERM, e.g. a cluster's time limit): keep the progress of the interrupted epoch in
        # last.ckpt; a resumed run continues at the next batch (see EpochShuffleSampler).
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and self.save_last:
            trainer.save_checkpoint(os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION))
