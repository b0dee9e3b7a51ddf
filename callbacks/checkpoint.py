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

A SIGTERM (or Ctrl-C) that arrives during an epoch's validation is held until the validation has ended:
Lightning would otherwise stop mid-validation, and the resumed run skips the rest of that validation, so the
epoch's row in metrics.jsonl would have no validation loss or accuracy (a gap in Figure 1). The epoch then
ends normally (its row, its `last.ckpt`) and the run stops right after.
"""

from __future__ import annotations

import os
import signal
import threading

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

    _HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: SLURM's preemption warning

    def on_validation_start(self, trainer, pl_module) -> None:
        super().on_validation_start(trainer, pl_module)
        self._held: list[int] = []
        self._handlers: dict[int, object] = {}
        if trainer.state.fn != TrainerFn.FITTING or threading.current_thread() is not threading.main_thread():
            return
        for number in self._HELD_SIGNALS:
            handler = signal.getsignal(number)
            if callable(handler):
                self._handlers[number] = handler
                signal.signal(number, self._hold)

    def _hold(self, number: int, _frame) -> None:
        if number == signal.SIGINT and number in self._held:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self._held.append(number)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._release()

    def _release(self, replay: bool = True) -> None:
        handlers, held = getattr(self, "_handlers", {}), getattr(self, "_held", [])
        self._handlers, self._held = {}, []
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held if replay else []):  # now Lightning's (and qreg's Ctrl-C) handler sees it
            handlers[number](number, None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict) -> None:
        """A resume that reaches its run folder by another spelling (relative where the run was started with an
        absolute path, from another working directory, through a symlink) keeps tracking the best checkpoint:
        Lightning compares the folders as strings and would forget it, writing a second `best-*.ckpt` beside the
        first at the next validation."""
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath and _same_folder(stored, self.dirpath):
            def respelled(path):
                return os.path.join(self.dirpath, os.path.basename(path)) if path and _same_folder(
                    os.path.dirname(path), stored) else path

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_k_models": {respelled(p): v for p, v in state_dict.get("best_k_models", {}).items()},
                          **{key: respelled(state_dict[key]) for key in ("best_model_path", "kth_best_model_path",
                                                                          "last_model_path") if key in state_dict}}
        super().load_state_dict(state_dict)

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
        self._release(replay=False)  # stopping already: restore the handlers only
        # Preemption (SIGTERM at a cluster's time limit, SIGUSR1 from SLURM's --signal, app/preemption.py): keep
        # the progress of the interrupted epoch in last.ckpt; a resumed run continues at the next batch (see
        # EpochShuffleSampler).
        # Ctrl-C takes the same path (app/signals.py turns it into Lightning's SIGTERM flag, so it lands between
        # batches).
        if (isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and self.save_last
                and self.dirpath is not None):
            trainer.save_checkpoint(os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION))


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is gone (or not a local path)
        return False
