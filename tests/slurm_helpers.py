"""What the SLURM tier needs besides the cluster: a digits DataModule that stops once where a test wants a signal
to land, and a small client of the local cluster.

`PausingDigits` is `DigitsDataModule` with one addition: at the points its `plan` names for the running run
folder (a study cell's name, or "*" for any), it writes a marker file and waits there until a signal ends the wait,
once (a requeued run finds the marker and goes on). The test sees the marker and sends the signal, so the signal
lands exactly there, with no timing involved. It trains exactly like `DigitsDataModule` (the pause draws no random
number), so a paused and resumed run can be compared bitwise with an uninterrupted one.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from unittest import mock

from datamodules.corruptions.splits import CorruptionCache
from datamodules.digits import DigitsDataModule

WAIT_LIMIT = 240  # s a pause waits for its signal before it fails the run (a test that never sent one)
INIT, BATCH, CORRUPTION = "init", "batch", "corruption"  # start-up, epoch 1 batch 1, after the first corrupted split


def marker(folder: str | os.PathLike, where: str, run: str) -> Path:
    rank = os.environ.get("SLURM_PROCID", "0")
    return Path(folder) / f"{where}-{run.replace('*', 'run')}-rank{rank}"


class PausingDigits(DigitsDataModule):
    def __init__(self, plan: dict[str, list[str]] | None = None, markers: str = "markers", **kwargs) -> None:
        super().__init__(**kwargs)
        self.plan, self.markers = plan or {}, markers
        self._pause_if_planned(INIT, "*")

    def _run_name(self) -> str:
        trainer = getattr(self, "trainer", None)
        name = Path(trainer.default_root_dir).name if trainer is not None else "*"
        return name if name in self.plan else "*"

    def _pause_if_planned(self, where: str, run: str) -> None:
        if where not in self.plan.get(run, []):
            return
        reached = marker(self.markers, where, run)
        if reached.exists():  # the requeued run: it paused here before
            return
        reached.parent.mkdir(parents=True, exist_ok=True)
        reached.touch()
        print(f"slurm test: paused at {where} ({reached.name}), waiting for a signal", flush=True)
        trainer = getattr(self, "trainer", None)
        deadline = time.monotonic() + WAIT_LIMIT
        while time.monotonic() < deadline:
            # A signal either ends the process's wait by an exception (outside a fit), or asks the fit to stop at
            # the end of this batch.
            if trainer is not None and trainer.received_sigterm:
                return
            time.sleep(0.05)
        raise RuntimeError(f"slurm test: no signal came at {where} within {WAIT_LIMIT} s")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer.training and trainer.current_epoch == 1 and trainer.fit_loop.epoch_loop.batch_idx == 1:
            self._pause_if_planned(BATCH, self._run_name())
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def _corrupted_test_sets(self):
        run, original = self._run_name(), CorruptionCache.generate
        if CORRUPTION not in self.plan.get(run, []):
            return super()._corrupted_test_sets()

        def generate(cache, splits, workers: int = 1, progress=None):
            def paused(*split):
                if progress is not None:
                    progress(*split)
                self._pause_if_planned(CORRUPTION, run)  # the pool's other splits are still being written

            return original(cache, splits, workers, paused)

        with mock.patch.object(CorruptionCache, "generate", generate):
            return super()._corrupted_test_sets()


class Cluster:
    """The local cluster's commands, with its slurm.conf."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` of one job (an array task as <array>_<task>) as a dict; {} when unknown."""
        text = self.run("scontrol", "show", "job", "--oneliner", job, check=False).strip()
        if not text:
            return {}
        fields = dict(item.split("=", 1) for item in text.splitlines()[0].split() if "=" in item)
        return fields

    def release_requeued(self, job: str) -> None:
        """A requeued job waits 2 minutes (SLURM's delay for its old steps to end): start it now instead."""
        info = self.job(job)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
