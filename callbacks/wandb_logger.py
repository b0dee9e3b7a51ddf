"""`ResilientWandbLogger`: W&B that never takes a training run down.

A missing key means offline logging (decided in cli.py); anything else going wrong when the W&B run starts
(a malformed WANDB_MODE, an unreachable server, a full disk, wandb's own bugs) prints one warning and the run
carries on with W&B disabled. Everything the report needs is on disk anyway (metrics.jsonl, results.jsonl).
"""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


class ResilientWandbLogger(WandbLogger):
    @property
    def experiment(self):
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as error:  # noqa: BLE001 - any W&B failure, by design
            if self._experiment is not None:
                raise
            rank_zero_warn(f"W&B could not start ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                           "training continues without W&B")
            self._wandb_init["mode"] = "disabled"
            self._offline = False
            try:
                return WandbLogger.experiment.fget(self)
            except Exception:  # noqa: BLE001
                from lightning.fabric.loggers.logger import _DummyExperiment

                self._experiment = _DummyExperiment()
                return self._experiment
