"""Writing an exported file: refuse an unwritable path before any work, and never leave a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from deploy.errors import ExportError


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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
