"""Where a run writes, decided before anything is written.

One folder per run: `runs/<first config's stem>-<time>/` (`-slurm<job>` under SLURM, so that a requeued job
finds its own checkpoint there), the checkpoint's own folder for a resume or an evaluation, and beside the cells
for the evaluation of a study cell (study/layout.py). A fit into a folder that holds another run is refused.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from callbacks.resume_changes import ResumeRefused
from study.layout import RUNS_DIR, evaluation_dir, is_study_cell
from user_errors import UserError

LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # Lightning resolves these names itself


class RunFolderError(UserError):
    """A run folder that cannot be used (a file, unwritable, a study cell's for an evaluation)."""


def default_run_dir(config: Any, subcommand: str) -> str:
    """One directory per run: runs/<first config's stem>-<time>, or the checkpoint's run for evaluation.

    The evaluation of a study cell's checkpoint gets a folder of its own, `<study>/evaluations/<cell>-<ckpt>-
    <time>`: written into the cell's folder, its predictions.npz and results would replace the records the
    study's report reads.

    A resume (`fit --ckpt_path <run>/checkpoints/last.ckpt`) continues in the checkpoint's run folder: its
    config.yaml, metrics.jsonl, results and W&B run (whose id the folder gives) go on, as the interrupted-run
    message promises; `refuse_rewriting_history` refuses an earlier checkpoint there (it would rewrite the later
    history)."""
    ckpt_path = config.get("ckpt_path")
    if subcommand == "fit" and ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:
        run = resumed_run_folder(ckpt_path)
        if run is not None and is_study_cell(run):
            raise RunFolderError(
                f"checkpoint {ckpt_path} is study cell {run}'s: resume the study (cli.py study --config <study>) "
                "to continue the cell, or give --trainer.default_root_dir a new folder for a run of its own")
        if run is not None:
            return str(run)
    if subcommand != "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        run = Path(ckpt_path).parent.parent
        if is_study_cell(run):
            return _reserve(evaluation_dir(run, Path(ckpt_path).stem, time.strftime("%Y%m%d-%H%M%S")))
        return str(run)
    configs = config.get("config") or []
    stem = Path(str(configs[0])).stem if configs else "run"
    # Under SLURM the folder is named after the job, which a requeue keeps: the requeued job finds its own
    # hpc checkpoint there and continues the same W&B run.
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return str(RUNS_DIR / f"{stem}-slurm{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', 0)}")
    if env.get("SLURM_JOB_ID"):
        return str(RUNS_DIR / f"{stem}-slurm{env['SLURM_JOB_ID']}")
    return _reserve(RUNS_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


_RESERVED: list[Path] = []  # run folders this process created for itself (removed again if left empty)


def _reserve(folder: Path) -> str:
    """Create a fresh run folder, adding -2, -3, ... when another run started in the same second took the
    name: two fits of one config started together never share (and overwrite) one folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = folder if attempt == 1 else folder.with_name(f"{folder.name}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _RESERVED.append(candidate)
        return str(candidate)
    raise RunFolderError(f"cannot find a free run folder name next to {folder}")


def release_unused_run_folders() -> None:
    """However a run ended: a folder it reserved and never wrote to goes again."""
    while _RESERVED:
        folder = _RESERVED.pop()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty: a run that wrote anything keeps its folder


def refuse_evaluation_in_cell(folder: str | os.PathLike) -> None:
    if is_study_cell(Path(folder)):
        raise RunFolderError(
            f"{folder} is a study cell's folder: an evaluation there would replace the records the study's report "
            "reads; leave --trainer.default_root_dir unset (the evaluation then gets "
            "<study>/evaluations/<cell>-<checkpoint>-<time>/) or choose another folder")


def check_run_folder(folder: str | os.PathLike) -> None:
    """Refuse, before anything is written, a run folder that is a file, or that cannot be created or written
    (missing permission, read-only file system)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run folder {path} exists and is not a directory; set --trainer.default_root_dir")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"run folder {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(existing) else "is not writable"
        raise RunFolderError(f"run folder {path} cannot be written: {existing} {why}")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def checkpoint_run_folder(ckpt_path: str | os.PathLike) -> Path:
    """The run folder a checkpoint belongs to: `<run>/checkpoints/*.ckpt`, or `<run>/hpc_ckpt_*.ckpt`."""
    path = Path(ckpt_path).absolute()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def holds_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or any((folder / "checkpoints").glob("*.ckpt"))


def continued_in_place(folder: Path) -> str | None:
    """Why a fit without --ckpt_path may go on in a folder that holds a run: a study restarting its cell from
    scratch (no checkpoint of it loads), or a SLURM requeue (Lightning resumes its own hpc checkpoint)."""
    if is_study_cell(folder):
        return "study cell"
    if any(folder.glob("hpc_ckpt_*.ckpt")):
        return "hpc checkpoint"
    if os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0"):
        return "SLURM requeue"
    return None


def refuse_existing_run(folder: Path) -> None:
    """A fit without --ckpt_path into a folder that already holds a run: one line, nothing there touched."""
    if not holds_run(folder) or continued_in_place(folder):
        return
    last = folder / "checkpoints" / "last.ckpt"
    resume = (f"or continue it with --ckpt_path {last}" if last.is_file()
              else "(it holds no checkpoints/last.ckpt to continue from)")
    raise ResumeRefused(f"run folder {folder} already holds a run (config.yaml, checkpoints): choose a new folder "
                        "with --trainer.default_root_dir (or leave it unset for a fresh runs/<config>-<time>), "
                        f"{resume}")


def refuse_foreign_folder(folder: Path, ckpt_path: str) -> None:
    """A resume written into a folder that holds another run (not the checkpoint's)."""
    run = checkpoint_run_folder(ckpt_path)
    if run.resolve() == folder.absolute().resolve() or not holds_run(folder):
        return
    raise ResumeRefused(f"run folder {folder} holds another run than checkpoint {ckpt_path}'s ({run}): continue "
                        f"that run in its own folder (--trainer.default_root_dir {run}) or choose a new folder")


def resumed_run_folder(ckpt_path: str | os.PathLike) -> Path | None:
    """The run folder a resume from `ckpt_path` continues when no --trainer.default_root_dir is given: the
    checkpoint's own run (`<run>/checkpoints/*.ckpt`, `<run>/hpc_ckpt_*.ckpt`), as the path names it; None for
    a checkpoint outside a run folder (its resume starts a new run folder)."""
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints":
        run = path.parent.parent
    elif path.name.startswith("hpc_ckpt_"):
        run = path.parent
    else:
        return None
    return run if holds_run(run) else None


def refuse_rewriting_history(folder: Path, ckpt_path: str) -> None:
    """A resume from an earlier checkpoint of a run (`best-<epoch>.ckpt`) into that run's own folder, beside its
    later `last.ckpt`: going on there would overwrite the run's later history (its last.ckpt, the later epochs
    of metrics.jsonl, its results and W&B run). A study resumes a cell from `best-*.ckpt` only when its
    `last.ckpt` did not load (and was renamed `.damaged`): that is allowed, there is no later checkpoint."""
    path = Path(ckpt_path)
    run = checkpoint_run_folder(path)
    last = run / "checkpoints" / "last.ckpt"
    if path.name == last.name or path.name.startswith("hpc_ckpt_") or not last.is_file():
        return
    if run.resolve() != folder.absolute().resolve():
        return
    shown = path.parent / last.name if path.parent.name == "checkpoints" else last  # as the user spelled the path
    raise ResumeRefused(f"resuming {ckpt_path} in its own run folder {run} would rewrite that run's later history "
                        f"(its {last.name}, the later epochs of metrics.jsonl, its results): continue the run from "
                        f"{shown}, or start a new run from this checkpoint with --trainer.default_root_dir "
                        "<new folder>")


