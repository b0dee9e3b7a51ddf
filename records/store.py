"""The results store: a JSON-lines file of evaluation rows that every report is derived from.

Appends are atomic and safe for concurrent writers (job-array tasks sharing a study directory): under an
exclusive lock the file is copied with the new rows to a temporary file, fsynced and renamed over the
original, so a crash leaves either the old file or the new one, never a partial line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from user_errors import UserError

RESULTS_FILE = "results.jsonl"
FIELDS = (
    "run", "study", "model", "dataset", "method", "weight_bits", "act_bits", "seed",
    "epoch", "step",  # the training epoch (0-based) and global step of the weights measured
    "split", "corruption", "severity", "metric", "value",
)
# Fields that stores written before they existed lack, as do measures of no checkpoint: None there.
LATER_FIELDS = ("epoch", "step")


class ResultsStoreError(UserError):
    """A results file that cannot be read, or a row that does not fit the schema."""


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    missing = [f for f in FIELDS if f not in row]
    extra = [f for f in row if f not in FIELDS]
    if missing or extra:
        raise ResultsStoreError(f"results row fields differ from the schema: missing {missing}, extra {extra}")
    value = row["value"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultsStoreError(f"results row value must be a number, got {value!r}")
    return {f: row[f] for f in FIELDS}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `<path>.lock` (POSIX flock), held for a read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def write_atomically(
    path: Path, data: bytes | memoryview | Callable[[BinaryIO], Any], check: Callable[[Path], None] | None = None
) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to `path` via a temporary file in the same
    folder, fsync, `check(temporary path)` if given, rename, fsync the folder. On any failure, the check's
    included, the temporary file is removed and `path` keeps what it held: never a part of a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            data(handle) if callable(data) else handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _encode(row: dict[str, Any]) -> str:
    value = row["value"]
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/inf; keep the information as a string the reader turns back into a float.
        row = {**row, "value": repr(value)}
    return json.dumps(row, sort_keys=False)


def append_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Append rows (checked against the schema) atomically; returns how many were written."""
    path = Path(path)
    lines = "".join(_encode(check_row(r)) + "\n" for r in rows)
    if not lines:
        return 0
    with locked(path):
        existing = path.read_bytes() if path.exists() else b""
        if existing and not existing.endswith(b"\n"):
            raise ResultsStoreError(f"{path} ends with a partial line; it was not written by qreg, fix it by hand")
        write_atomically(path, existing + lines.encode())
    return lines.count("\n")


def json_lines(path: Path, parse: Callable[[dict], Any], what: str, error: type[Exception]) -> Iterator[Any]:
    """`parse(object)` of every non-blank line of a JSON-lines file. A line that is not a JSON object, or that
    `parse` rejects (ValueError, KeyError, TypeError), is `error` naming the file, the line and `what` it should be."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                found = json.loads(line)
                if not isinstance(found, dict):
                    raise ValueError("not a JSON object")
                yield parse(found)
            except (ValueError, KeyError, TypeError) as problem:
                raise error(f"{path}:{number} is not a valid {what} ({problem}); fix or delete that line") from None


def _stored_row(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("value") in ("nan", "inf", "-inf"):
        row["value"] = float(row["value"])
    return check_row({**{name: None for name in LATER_FIELDS}, **row})


def move_rows(path: str | os.PathLike, run: str, destination: str | os.PathLike) -> int:
    """Move every row of `run` from the store `path` to the store `destination` (appended); returns how many.

    Under the store's lock the rows are first appended to `destination`, then `path` is rewritten without them
    (the other lines byte for byte), each write atomic: a crash leaves the rows in both files, never in neither."""
    path = Path(path)
    if not path.is_file():
        return 0
    with locked(path):
        rows = read_rows(path)  # a malformed line is refused before anything moves
        mine = [row for row in rows if row["run"] == run]
        if not mine:
            return 0
        append_rows(destination, mine)
        with open(path, encoding="utf-8") as handle:
            kept = [line for line in handle if line.strip() and json.loads(line).get("run") != run]
        write_atomically(path, "".join(kept).encode())
    return len(mine)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a results file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ResultsStoreError(f"no results file at {path}")
    return list(json_lines(path, _stored_row, "results row", ResultsStoreError))
