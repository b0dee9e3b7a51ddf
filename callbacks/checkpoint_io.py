"""Checkpoint files as qreg reads and writes them: validated before use, written atomically.

- `read_checkpoint(path)`: the one check every checkpoint qreg is handed goes through (`fit`/`test
  --ckpt_path`, a study's resume, `theorem`): it exists, is a file, loads, and carries the keys qreg's own
  checkpoints have (weights, epoch and step, the quantization spec). Anything else is a `CheckpointError`
  naming the file, one line, instead of a traceback from deep inside torch or Lightning.
- `AtomicCheckpointIO`: Lightning's `TorchCheckpointIO` with the write done as a temporary file in the
  destination folder, fsync, rename. Lightning's own write goes through fsspec, which stages the bytes in
  `$TMPDIR` and *copies* them into place when the run folder is on another file system (the usual cluster
  case): a crash or a full disk during that copy left a half-written checkpoint under the final name.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from quantizers import CHECKPOINT_KEY
from records.store import write_atomically
from user_errors import UserError

# What every checkpoint qreg writes holds; a file without them is not one of qreg's (or is damaged).
REQUIRED_KEYS = ("state_dict", "epoch", "global_step", CHECKPOINT_KEY)


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: missing, not a file, unreadable, or not one of qreg's."""


class CheckpointWriteError(OSError, UserError):
    """A checkpoint that could not be written (no space, read-only folder); nothing partial is left."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def read_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load a checkpoint on the CPU after checking it is a qreg checkpoint; `CheckpointError` names the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError, TypeError, UnicodeDecodeError) as error:
        # torch.load reports a truncated zip as RuntimeError, a text file as UnpicklingError, ... An OSError
        # (EIO, a stale network handle) says nothing about the file's content: it propagates, so a study does
        # not set aside a sound checkpoint as damaged because its file system hiccupped.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded (damaged or not a checkpoint): {reason}") from None
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (it holds a {kind})")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a qreg checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def task_label(model_class: type) -> str:
    """'classification model (ClassificationModule)', 'detection model (DetectionModule)'."""
    return f"{model_class.__name__.removesuffix('Module').lower()} model ({model_class.__name__})"


def task_module_class(class_path: str | None) -> type | None:
    """The qreg task module a class path names (a config's `model.class_path`, the `_class_path` a fit through
    cli.py stores among a checkpoint's hyperparameters), or None when it names none."""
    import importlib

    from lightning_modules.task import TaskModule

    module_path, _, name = str(class_path or "").rpartition(".")
    try:
        found = getattr(importlib.import_module(module_path), name) if module_path else None
    except (ImportError, AttributeError, ValueError):
        found = None
    return found if isinstance(found, type) and issubclass(found, TaskModule) else None


def check_checkpoint_task(ckpt_path: str | os.PathLike, stored: type | None, configured: type | None,
                          command: str) -> None:
    """Refuse a checkpoint of another task than the config's model (a detector's under a classifier config, or
    the reverse), naming both, before anything loads it: Lightning would switch to the checkpoint's class, or
    fail on the first mismatched tensor with a long traceback. `command`: what the user runs ('test', 'export')."""
    if stored is None or configured is None or issubclass(stored, configured):
        return
    raise CheckpointError(f"{ckpt_path} is the checkpoint of a {task_label(stored)} but the config's model is a "
                          f"{task_label(configured)}: {command} it with its own run's config "
                          "(--config runs/<run>/config.yaml)")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """None when `path` is a usable qreg checkpoint, else the one-line reason."""
    try:
        read_checkpoint(path)
    except CheckpointError as error:
        return str(error)
    return None


def run_checkpoints(folder: Path) -> list[Path]:
    """A run folder's checkpoints, newest first: `last.ckpt`, `best-*.ckpt`, and Lightning's SLURM
    `hpc_ckpt_*.ckpt` (written by runs before qreg owned the preemption signal)."""
    checkpoints = folder / "checkpoints"
    candidates = [checkpoints / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt"), *checkpoints.glob("best-*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return sorted(existing, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_loadable_checkpoint(folder: Path) -> Path | None:
    """The newest of `run_checkpoints(folder)` that loads as a qreg checkpoint; damaged ones are passed over,
    not renamed (every DDP rank must reach the same answer)."""
    return next((path for path in run_checkpoints(folder) if checkpoint_problem(path) is None), None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint Lightning saves (ModelCheckpoint, `trainer.save_checkpoint`, SLURM's hpc checkpoint)
    lands atomically on the run folder's own file system; loading validates the file first."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        # Serialised in memory first, so that a write error is the OSError of the write itself (torch.save into
        # the file would wrap a full disk in its own RuntimeError); getbuffer() hands it over without a copy.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            write_atomically(Path(path), buffer.getbuffer())
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise CheckpointWriteError(error.errno or errno.EIO, f"cannot write checkpoint {path}: {reason}; "
                                       "nothing was left half-written") from error

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        # Loaded on the CPU: Lightning copies the weights into the module and moves the optimizer state to
        # the module's device afterwards.
        return read_checkpoint(path)
