"""Writing an exported file: refuse an unwritable path before any work, and never leave a partial file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from deploy.errors import ExportError
from records.store import write_atomically


def check_writable(path: Path) -> None:
    """Fail early, with one line, where `path` cannot be written (a folder, a file used as a folder, ...)."""
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a folder; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"cannot write {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: {existing} is not writable")


def write_file(path: Path, data: bytes, check: Callable[[Path], None] | None = None) -> None:
    """Write `data` to a temporary file beside `path`, run `check` on it, then rename it to `path`.

    A failed write or check removes the temporary file: `path` holds its old content or the new one, never a
    part, and never an export that failed its check.
    """
    check_writable(path)
    try:
        write_atomically(path, data, check)
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
