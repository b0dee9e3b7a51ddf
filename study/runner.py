"""Run a study's cells locally, resumably: one `cli.py fit` subprocess per cell.

What makes it resumable and safe to kill:
- a cell is finished when its test rows are in the study's results store (written in one atomic append at
  the end of the cell's test), so a finished cell is never rerun and a killed one left no rows;
- a killed cell restarts from its own `checkpoints/last.ckpt`;
- each cell runs under an exclusive lock on its folder, so two runners (or job-array tasks) never train
  the same cell at once, and the cell's process dies with the runner (Linux parent-death signal) instead
  of training on, orphaned;
- a diverged cell (exit status 3, a `diverged` row) is recorded and the study goes on;
- SIGTERM, SIGINT or SIGUSR1 sent to the runner reaches the running cell (which saves its checkpoint) and
  stops the study once the cell has exited: the cell is "interrupted", not "failed", no further cell starts,
  and the study ends with the cell's status (143 / 130 / 138: SIGTERM, Ctrl-C, SLURM preemption) and resumes
  that cell on the next run;
- a cell whose `last.ckpt` cannot be loaded resumes from its newest loadable checkpoint instead
  (`best-*.ckpt`, Lightning's `hpc_ckpt_*.ckpt`), or from scratch, and says which;
- a cell is what its config says (study/identity.py): before anything runs, each cell's config is resolved and
  compared with the one its folder was run with; a finished, diverged or checkpointed cell whose config changed
  is refused (or, with --force, its folder and rows are moved to `<study>/superseded/` and it retrains), and a
  study folder holds one study (`study.json`);
- each cell's output is also appended to `<cell>/cell.log` (its stderr only while the runner writes to a terminal,
  so that the progress bars stay live there).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from callbacks.checkpoint_io import checkpoint_problem, run_checkpoints
from records.exits import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR
from records.measures import COLLAPSED_METRIC, SCORE_METRICS
from records.preemption import PREEMPTION_SIGNAL, block_preemption, note_preemption
from records.splits import CLEAN
from records.store import RESULTS_FILE, move_rows, read_rows
from study.grid import Cell, StudyConfig, StudyError
from study.identity import (
    compared_config,
    describe,
    differences,
    digest,
    recorded_config,
    resumable,
    study_of,
    write_cell_record,
    write_study_record,
)
from study.layout import CELL_LOCK, CELL_LOG, CORRUPTIONS, ENTRY_POINT, STUDY_FILE, SUPERSEDED, cell_dir

# what `cli.py fit` ends with after Ctrl-C / SIGTERM / a preemption (SIGUSR1), having saved last.ckpt
INTERRUPTED_STATUSES = (EXIT_SIGINT, EXIT_SIGTERM, EXIT_PREEMPTED)
RESUMABLE = "interrupted, with a checkpoint"


@dataclass
class Outcome:
    cell: Cell
    # finished | collapsed (finished, a dead model) | diverged | failed | interrupted (a signal; resumes next run)
    # | skipped (done before)
    # | busy (running elsewhere)
    status: str
    seconds: float = 0.0
    detail: str = ""
    exit_status: int = 0  # for an interrupted cell: 143 (SIGTERM), 130 (SIGINT), ...


def cell_status(rows: list[dict], cell: Cell) -> str | None:
    """'finished', 'collapsed' (finished, its model dead) or 'diverged' from the store, or None when the cell
    still has to run."""
    mine = [r for r in rows if r["run"] == cell.name]
    if any(r["metric"] == "diverged" for r in mine):
        return "diverged"
    if any(r["metric"] in SCORE_METRICS and r["corruption"] == CLEAN for r in mine):
        return "collapsed" if any(r["metric"] == COLLAPSED_METRIC for r in mine) else "finished"
    return None


@contextlib.contextmanager
def cell_lock(directory: Path) -> Iterator[bool]:
    """Yields True while holding the cell's lock, False if another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CELL_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start_cell() -> None:
    """preexec_fn: the cell starts with SLURM's preemption signal blocked (its first line installs its handler and
    then takes a signal that came before), and Linux SIGKILLs it if the runner dies (prctl PR_SET_PDEATHSIG)."""
    block_preemption()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def resume_checkpoint(folder: Path) -> tuple[Path | None, str]:
    """The checkpoint a cell resumes from: the newest that loads as a qreg checkpoint, and a note saying so
    when that is not the newest file (a damaged `last.ckpt`, e.g. a node crash mid-write), or when none loads
    and the cell restarts from scratch. A damaged file is renamed `<name>.damaged` (kept for inspection, and
    never resumed from or evaluated by mistake again)."""
    damaged: list[str] = []
    for path in run_checkpoints(folder):
        problem = checkpoint_problem(path)
        if problem is None:
            note = f"{', '.join(damaged)} did not load; resuming from {path.name}" if damaged else ""
            return path, note
        damaged.append(path.name)
        path.replace(path.with_name(path.name + ".damaged"))
    note = f"{', '.join(damaged)} did not load (renamed *.damaged); restarting the cell from scratch" if damaged else ""
    return None, note


# The exit status a shell reports for a process ended by each signal the runner forwards.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def signal_status(number: int) -> int:
    return 128 + int(number)


class SignalForwarder:
    """While active, SIGTERM/SIGINT/SIGUSR1 sent to the runner are recorded and passed to the running cell
    (it saves `last.ckpt`; under SLURM the runner's own process requeues the job, app/preemption.py); the runner
    itself keeps going until
    the cell has exited, then stops the study."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, _frame) -> None:
        if self.received is None:
            self.received = number
        if number == PREEMPTION_SIGNAL:
            note_preemption()  # under SLURM, cli.py requeues the job once the study has stopped
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    def __enter__(self) -> SignalForwarder:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def run(self, command: list[str], env: dict[str, str], log: Path | None = None) -> int:
        """Run a cell in its own process group (a Ctrl-C at the terminal reaches it once, forwarded, not
        twice); returns its exit status, 128 + N for a cell a signal N ended. With `log`, the cell's output also
        goes to that file (appended; its stdout only when the runner's is not a terminal: there the cell keeps
        the terminal, and its live progress bars)."""
        streams = [] if log is None else [2] if os.isatty(1) else [1, 2]
        pipes = {("stdout" if fd == 1 else "stderr"): subprocess.PIPE for fd in streams}
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(open(log, "ab")) if log is not None else None
            if sink is not None:
                kept = "" if 1 in streams else " (stderr only: stdout went to the terminal)"
                sink.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}{kept}\n".encode())
                sink.flush()
            self.process = subprocess.Popen(command, env=env, preexec_fn=_start_cell, process_group=0, **pipes)
            lock = threading.Lock()
            tees = [threading.Thread(target=_tee, args=(self.process.stdout if fd == 1 else self.process.stderr, fd,
                                                        sink, lock), daemon=True) for fd in streams]
            for tee in tees:
                tee.start()
            if self.received is not None:  # the signal came while the cell was being prepared: not forwarded
                self.process.send_signal(self.received)
            try:
                while True:
                    try:
                        code = self.process.wait()
                        break
                    except InterruptedError:  # pragma: no cover - wait() retries on EINTR itself
                        continue
            finally:
                self.process = None
                for tee in tees:
                    tee.join(timeout=10)  # a child the cell left behind may hold the pipe: do not wait on it
            status = signal_status(-code) if code < 0 else code
            if sink is not None:
                with lock:
                    sink.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} exit status {status}\n".encode())
                    sink.close()
        return status


def _tee(source, fd: int, sink, lock: threading.Lock) -> None:
    """Copy a cell's output stream to the runner's file descriptor `fd` and to the cell's log, as it comes."""
    shown = True
    for chunk in iter(lambda: source.read1(65536), b""):
        left = chunk
        while shown and left:
            try:
                left = left[os.write(fd, left):]
            except OSError:  # the runner's output was closed (a pipe whose reader quit): keep the log going
                shown = False
        with lock:
            if not sink.closed:  # closed when the cell ended and a process it left behind still writes
                sink.write(chunk)
                sink.flush()
    source.close()


class StudyRunner:
    """`resolve(fit arguments) -> config`: the config a cell's `cli.py fit` would run with, parsed, nothing built
    (`app.lightning_cli.resolve_fit_config`, which `cli.py study` passes)."""

    def __init__(self, study: StudyConfig, study_file: Path | None = None,
                 resolve: Callable[[list[str]], dict] | None = None) -> None:
        self.study = study
        self.resolve = resolve
        self.identities: dict[str, dict] = {}  # cell name -> its compared config, resolved by check()
        self.supersede_cells: set[str] = set()  # cells whose old folder and rows check() decided to move aside
        self.cells = study.cells()
        self.directory = study.directory()
        root = study_file.parent if study_file is not None else Path.cwd()
        self.stopped_by: int | None = None
        self.bases = [str(p if Path(p).is_absolute() else (root / p).resolve()) for p in study.base]
        missing = [p for p in self.bases if not Path(p).is_file()]
        if missing:
            raise StudyError(f"study base config not found: {missing[0]} (base paths are relative to the study file)")

    @property
    def store(self) -> Path:
        return self.directory / RESULTS_FILE

    def cell_directory(self, cell: Cell) -> Path:
        return cell_dir(self.directory, cell.name)

    def rows(self) -> list[dict]:
        return read_rows(self.store) if self.store.exists() else []

    def cell_log(self, cell: Cell) -> Path:
        return self.cell_directory(cell) / CELL_LOG

    def command(self, cell: Cell, resume: Path | None = None) -> list[str]:
        folder = self.cell_directory(cell)
        command = []
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
            "--data.init_args.corrupted_test.cache_dir", str(self.directory / CORRUPTIONS),
            "--data.init_args.corrupted_test.workers", str(self.study.corruption_workers),
        ]
        if resume is not None:
            command += ["--ckpt_path", str(resume)]
        return [sys.executable, str(ENTRY_POINT), "fit", *command]

    def identity(self, cell: Cell) -> dict:
        """The cell's compared config now: its `cli.py fit` arguments parsed (nothing instantiated)."""
        # the resolver is the entry point's (app.lightning_cli.resolve_fit_config): never imported here
        if self.resolve is None:
            raise StudyError("this study runner was built without a config resolver; it cannot check its cells")
        return compared_config(self.resolve(self.command(cell)[3:]))

    def changes(self, cell: Cell, compared: dict) -> list[tuple]:
        """How the config the cell's folder was run with differs from `compared` ([] when it does not, or when
        the folder records no config)."""
        old, _ = recorded_config(self.cell_directory(cell))
        if old is None or digest(old) == digest(compared):
            return []
        return differences(old, compared)

    def check_owner(self) -> None:
        """A study folder belongs to one study: refuse another study's name before anything is written."""
        recorded, where = study_of(self.directory), STUDY_FILE
        if recorded is None and self.store.is_file():
            others = sorted({r["study"] for r in self.rows() if r["study"]} - {self.study.name})
            recorded, where = (others[0] if others else None), RESULTS_FILE
        if recorded is not None and recorded != self.study.name:
            raise StudyError(f"study folder {self.directory} belongs to study {recorded!r} (its {where}), not "
                             f"{self.study.name!r}: a study folder holds one study; give study {self.study.name!r} "
                             "its own output_dir")

    def check(self, cells: list[Cell], force: bool = False) -> None:
        """Before anything runs or is written: the folder is this study's, and no cell whose work would be reused
        (finished, diverged, or a checkpoint to resume) was run with another config than it gets now. Such cells
        are refused in one line, or with `force` marked to retrain (their old folder and rows moved aside); a
        changed cell with nothing to reuse is moved aside without asking."""
        self.check_owner()
        rows = self.rows()
        reused: list[tuple[Cell, str, list[tuple]]] = []
        for cell in cells:
            self.identities[cell.name] = self.identity(cell)
            folder = self.cell_directory(cell)
            if not folder.is_dir():
                continue
            work = cell_status(rows, cell) or (RESUMABLE if run_checkpoints(folder) else None)
            if work is not None and recorded_config(folder)[0] is None:
                print(f"=== cell {cell.name} ({work}): its folder records no config (config.yaml, cell.json) to "
                      "check against the study's; kept as it is", flush=True)
                continue
            found = self.changes(cell, self.identities[cell.name])
            if found and work == RESUMABLE:  # its fit's resume check lets it go on with what it may change
                found = [change for change in found if not resumable(change[0])]
            if found:
                self.supersede_cells.add(cell.name)
                if work is not None:
                    reused.append((cell, work, found))
        if reused and not force:
            texts = [describe(found) for _, _, found in reused]
            if len(set(texts)) == 1:
                named = ", ".join(f"{cell.name} ({work})" for cell, work, _ in reused)
                what = f"{named}: {texts[0]}"
            else:
                what = ", ".join(f"{cell.name} ({work}: {text})" for (cell, work, _), text in
                                 zip(reused, texts, strict=True))
            cells_word = "cell" if len(reused) == 1 else "cells"
            raise StudyError(
                f"study {self.study.name}: {len(reused)} {cells_word} in {self.directory} ran with another config than "
                f"the study gives now: {what}; add --force to retrain {'it' if len(reused) == 1 else 'them'} (the old "
                f"{'folder and rows are' if len(reused) == 1 else 'folders and rows are'} kept in "
                f"{self.directory / SUPERSEDED}), or give the study a new output_dir")

    def supersede(self, cell: Cell) -> Path | None:
        """Under the cell's lock: move its rows out of the store into its folder's own results.jsonl, then the
        folder to `<study>/superseded/<cell>-<time>/` (nothing deleted). None when another process holds the cell;
        the folder itself when there is nothing to move (another runner did it first)."""
        folder = self.cell_directory(cell)
        with cell_lock(folder) as held:
            if not held:
                return None
            if not self.changes(cell, self.identities[cell.name]):
                return folder
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = self.directory / SUPERSEDED / f"{cell.name}-{stamp}"
            for attempt in range(2, 1000):
                if not target.exists():
                    break
                target = target.with_name(f"{cell.name}-{stamp}-{attempt}")
            moved = move_rows(self.store, cell.name, folder / RESULTS_FILE)
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)  # the lock file goes with it: the cell starts again in a new folder
        print(f"=== cell {cell.name}: ran with another config; its old folder and {moved} result rows moved to "
              f"{target}", flush=True)
        return target

    def run_cell(self, cell: Cell, number: int, forwarder: SignalForwarder) -> Outcome:
        if cell.name in self.supersede_cells and self.supersede(cell) is None:
            return Outcome(cell, "busy", detail="another process is running this cell")
        status = cell_status(self.rows(), cell)
        if status is not None:
            return Outcome(cell, "skipped", detail=status)
        with cell_lock(self.cell_directory(cell)) as held:
            if not held:
                return Outcome(cell, "busy", detail="another process is running this cell")
            status = cell_status(self.rows(), cell)  # it may have finished while we waited for the lock
            if status is not None:
                return Outcome(cell, "skipped", detail=status)
            if cell.name in self.identities:
                write_cell_record(self.cell_directory(cell), cell.name, self.study.name, self.identities[cell.name])
            resume, note = resume_checkpoint(self.cell_directory(cell))
            resumed = f" (resuming from its checkpoint {resume.name})" if resume is not None else ""
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"\n=== study {self.study.name}: cell {number}/{len(self.cells)} {cell.name}{resumed}, "
                  f"started {started}", flush=True)
            if note:
                print(f"=== cell {cell.name}: {note}", flush=True)
            start = time.perf_counter()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            code = forwarder.run(self.command(cell, resume), env, log=self.cell_log(cell))
            seconds = time.perf_counter() - start
        print(f"=== cell {cell.name} ended {time.strftime('%Y-%m-%d %H:%M:%S')} (exit status {code}) after "
              f"{seconds / 60:.1f} min", flush=True)
        if code == EXIT_DIVERGED:
            return Outcome(cell, "diverged", seconds)
        if (forwarder.received is not None and code != 0) or code in INTERRUPTED_STATUSES:
            sent = signal.Signals(forwarder.received).name if forwarder.received is not None else "a signal"
            status = code if code in INTERRUPTED_STATUSES else signal_status(forwarder.received or signal.SIGTERM)
            return Outcome(cell, "interrupted", seconds, detail=f"stopped by {sent}; resumes from its checkpoint",
                           exit_status=status)
        if code != 0:
            if code == EXIT_USER_ERROR:
                raise StudyError(f"cell {cell.name} was refused (exit status {code}; its output: "
                                 f"{self.cell_log(cell)}): fix the study's config or args")
            return Outcome(cell, "failed", seconds, detail=f"exit status {code}")
        status = cell_status(self.rows(), cell)
        if status is None:
            return Outcome(cell, "failed", seconds, detail="it wrote no test results")
        detail = "its model is dead (see its collapsed line); kept out of the report's measures" \
            if status == "collapsed" else ""
        return Outcome(cell, status, seconds, detail=detail)

    def run(self, only: int | None = None, force: bool = False) -> list[Outcome]:
        """Run every unfinished cell (or only cell number `only`, 0-based, for a job-array task), until a
        signal stops the study: `self.stopped_by` is then the signal's number. Checked first (`check`): a cell
        whose config changed is refused, or with `force` retrained."""
        if only is not None and not 0 <= only < len(self.cells):
            raise StudyError(f"--cell {only} is out of range: the grid has cells 0..{len(self.cells) - 1}")
        chosen = list(enumerate(self.cells)) if only is None else [(only, self.cells[only])]
        self.check([cell for _, cell in chosen], force)
        self.directory.mkdir(parents=True, exist_ok=True)
        if study_of(self.directory) is None:
            write_study_record(self.directory, self.study.name)
        outcomes: list[Outcome] = []
        with SignalForwarder() as forwarder:
            for index, cell in chosen:
                if forwarder.received is not None:
                    break  # a signal between two cells: start no other
                outcomes.append(self.run_cell(cell, index + 1, forwarder))
                if outcomes[-1].status == "interrupted":
                    break
        self.stopped_by = forwarder.received
        return outcomes


def interruption(outcomes: list[Outcome], stopped_by: int | None) -> tuple[int, str] | None:
    """(exit status, what happened) when a signal stopped the study, else None."""
    cut = next((o for o in outcomes if o.status == "interrupted"), None)
    if cut is not None:
        return cut.exit_status, f"cell {cut.cell.name} was interrupted ({cut.detail})"
    if stopped_by is not None:
        name = signal.Signals(stopped_by).name
        return signal_status(stopped_by), f"stopped by {name} between cells"
    return None


def print_outcomes(outcomes: list[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="study cells")
    for column in ("cell", "status", "minutes", "note"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(o.cell.name, o.status, f"{o.seconds / 60:.1f}" if o.seconds else "", o.detail)
    Console().print(table)
    print(summary_line(outcomes), flush=True)


def summary_line(outcomes: list[Outcome]) -> str:
    """'study: 4 cells: 3 finished, 1 collapsed (lsq-w8a8-seed0)': every cell that gave no result to compare named."""
    by_status: dict[str, list[str]] = {}
    for o in outcomes:
        # a cell finished earlier counts as what it ended as
        status = o.detail if o.status == "skipped" and o.detail in ("finished", "collapsed", "diverged") else o.status
        by_status.setdefault(status, []).append(o.cell.name)
    named = ("collapsed", "diverged", "failed", "interrupted", "busy")
    parts = [f"{len(cells)} {status}" + (f" ({', '.join(cells)})" if status in named else "")
             for status, cells in by_status.items()]
    return f"study: {len(outcomes)} cells: {', '.join(parts)}"
