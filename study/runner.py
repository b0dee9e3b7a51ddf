"""Run a study's cells locally, resumably: one `cli.py fit` subprocess per cell.

What makes it resumable and safe to kill:
- a cell is finished when its test rows are in the study's results store (written in one atomic append at
  the end of the cell's test), so a finished cell is never rerun and a killed one left no rows;
- a killed cell restarts from its own `checkpoints/last.ckpt`;
- each cell runs under an exclusive lock on its folder, so two runners (or job-array tasks) never train
  the same cell at once, and the cell's process dies with the runner (Linux parent-death signal) instead
  of training on, orphaned;
- a diverged cell (exit status 3, a `diverged` row) is recorded and the study goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from records.exits import EXIT_DIVERGED, EXIT_USER_ERROR
from records.store import RESULTS_FILE, read_rows
from study.grid import Cell, StudyConfig, StudyError

CLI = Path(__file__).resolve().parents[1] / "cli.py"
FINAL_METRICS = ("accuracy", "map50")  # a cell whose clean test row exists is finished


@dataclass
class Outcome:
    cell: Cell
    status: str  # finished | diverged | failed | skipped (done before) | busy (running elsewhere)
    seconds: float = 0.0
    detail: str = ""


def cell_status(rows: list[dict], cell: Cell) -> str | None:
    """'finished' or 'diverged' from the store, or None when the cell still has to run."""
    mine = [r for r in rows if r["run"] == cell.name]
    if any(r["metric"] == "diverged" for r in mine):
        return "diverged"
    if any(r["metric"] in FINAL_METRICS and r["corruption"] == "clean" for r in mine):
        return "finished"
    return None


@contextlib.contextmanager
def cell_lock(directory: Path) -> Iterator[bool]:
    """Yields True while holding the cell's lock, False if another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".cell.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the cell if the runner dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest of `checkpoints/last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` in a cell folder."""
    candidates = [folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run a cell; SIGTERM/SIGINT/SIGUSR1 sent to the runner reach the cell (Lightning saves and, under
    SLURM, requeues on SIGUSR1)."""
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, lambda number, _frame: process.send_signal(number)) for sig in forwarded}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StudyRunner:
    def __init__(self, study: StudyConfig, study_file: Path | None = None) -> None:
        self.study = study
        self.cells = study.cells()
        self.directory = study.directory()
        root = study_file.parent if study_file is not None else Path.cwd()
        self.bases = [str(p if Path(p).is_absolute() else (root / p).resolve()) for p in study.base]
        missing = [p for p in self.bases if not Path(p).is_file()]
        if missing:
            raise StudyError(f"study base config not found: {missing[0]} (base paths are relative to the study file)")

    @property
    def store(self) -> Path:
        return self.directory / RESULTS_FILE

    def cell_directory(self, cell: Cell) -> Path:
        return self.directory / "cells" / cell.name

    def rows(self) -> list[dict]:
        return read_rows(self.store) if self.store.exists() else []

    def command(self, cell: Cell) -> list[str]:
        folder = self.cell_directory(cell)
        command = [sys.executable, str(CLI), "fit"]
        for base in self.bases:
            command += ["--config", base]
        command += list(self.study.args)
        command += cell.quantization_args()
        command += [
            "--seed_everything", str(cell.seed),
            "--trainer.default_root_dir", str(folder),
            "--results.path", str(self.store),
            "--results.study", self.study.name,
            "--results.run", cell.name,
            # Every cell is tested on the same corrupted splits: generate them once, for the whole study.
            "--data.init_args.corrupted_test.cache_dir", str(self.directory / "corruptions"),
            "--data.init_args.corrupted_test.workers", str(self.study.corruption_workers),
        ]
        resume = latest_checkpoint(folder)
        if resume is not None:
            command += ["--ckpt_path", str(resume)]
        return command

    def run_cell(self, cell: Cell, number: int) -> Outcome:
        status = cell_status(self.rows(), cell)
        if status is not None:
            return Outcome(cell, "skipped", detail=status)
        with cell_lock(self.cell_directory(cell)) as held:
            if not held:
                return Outcome(cell, "busy", detail="another process is running this cell")
            status = cell_status(self.rows(), cell)  # it may have finished while we waited for the lock
            if status is not None:
                return Outcome(cell, "skipped", detail=status)
            resumed = " (resuming from its checkpoint)" if latest_checkpoint(self.cell_directory(cell)) else ""
            print(f"\n=== study {self.study.name}: cell {number}/{len(self.cells)} {cell.name}{resumed}", flush=True)
            start = time.perf_counter()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            code = run_forwarding_signals(self.command(cell), env)
            seconds = time.perf_counter() - start
        if code == EXIT_DIVERGED:
            return Outcome(cell, "diverged", seconds)
        if code != 0:
            if code == EXIT_USER_ERROR:
                raise StudyError(f"cell {cell.name} was refused (exit status {code}): fix the study's config or args")
            return Outcome(cell, "failed", seconds, detail=f"exit status {code}")
        if cell_status(self.rows(), cell) is None:
            return Outcome(cell, "failed", seconds, detail="it wrote no test results")
        return Outcome(cell, "finished", seconds)

    def run(self, only: int | None = None) -> list[Outcome]:
        """Run every unfinished cell (or only cell number `only`, 0-based, for a job-array task)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if only is not None and not 0 <= only < len(self.cells):
            raise StudyError(f"--cell {only} is out of range: the grid has cells 0..{len(self.cells) - 1}")
        chosen = list(enumerate(self.cells)) if only is None else [(only, self.cells[only])]
        return [self.run_cell(cell, index + 1) for index, cell in chosen]


def print_outcomes(outcomes: list[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="study cells")
    for column in ("cell", "status", "minutes", "note"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(o.cell.name, o.status, f"{o.seconds / 60:.1f}" if o.seconds else "", o.detail)
    Console().print(table)
