"""`ResilientWandbLogger`: W&B that never takes a training run down.

A missing key means offline logging (`run_logger`); anything else going wrong when the W&B run starts
(a malformed WANDB_MODE, an unreachable server, a full disk, wandb's own bugs) prints one warning and the run
carries on with W&B disabled. Everything the report needs is on disk anyway (metrics.jsonl, results.jsonl).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from records.wandb_mode import wandb_is_online, wandb_project


def run_id(run_dir: str | os.PathLike, subcommand: str) -> str:
    """A stable W&B id per (run folder, subcommand): a resumed or requeued run continues its W&B run instead of
    starting a new one; the evaluation of a run is a run of its own."""
    return hashlib.sha1(f"{Path(run_dir).resolve()}:{subcommand}".encode()).hexdigest()[:16]


def run_logger(run_dir: str | os.PathLike, subcommand: str, group: str, tags: list[str]) -> ResilientWandbLogger:
    """The W&B logger of one run: named after its folder, offline unless a key is set (or WANDB_MODE says)."""
    run_name = Path(run_dir).resolve().name
    options = {}
    if not os.environ.get("WANDB_MODE"):
        os.environ.pop("WANDB_MODE", None)  # an empty value would make wandb refuse to start
        options["offline"] = not wandb_is_online()
    logger = ResilientWandbLogger(
        project=wandb_project(),
        name=run_name if subcommand == "fit" else f"{run_name}-{subcommand}",
        id=run_id(run_dir, subcommand),
        resume="allow",
        save_dir=str(run_dir),
        group=group,
        job_type="train" if subcommand == "fit" else "eval",
        tags=tags,
        **options,
    )
    # Lightning always passes wandb's deprecated `anonymous` setting, which makes wandb print a warning.
    logger._wandb_init.pop("anonymous", None)
    return logger


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
