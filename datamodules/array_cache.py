"""uint8 arrays cached as .npy with a content digest beside them, checked on every load.

A cache is only worth having if it is never served wrong: a file cut off by a crash, one overwritten with
zeros behind a valid header, or one from another source is detected here (its digest no longer matches) and
the caller rebuilds it, with a warning. Writes are atomic (temporary file in the same folder, fsync, rename),
the array first and its digest last, so a digest on disk always describes a whole array.

The digest is BLAKE2b over the array's bytes: about 1 GB/s on one core, a small part of decoding or
corrupting the images it guards (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from records.store import write_atomically


class CacheWarning(UserWarning):
    """A cached array was damaged or stale and is being rebuilt."""


def array_digest(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([list(array.shape), str(array.dtype)]).encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".digest")


def save_json(path: Path, record: dict) -> None:
    write_atomically(Path(path), json.dumps(record).encode())


def save_array(path: Path, array: np.ndarray, source: str = "") -> None:
    """Save `array` and then its digest (and the `source` key it was built from) atomically."""
    path = Path(path)
    digest_path(path).unlink(missing_ok=True)  # never a new array behind an old digest, even for a moment
    write_atomically(path, lambda handle: np.save(handle, array))
    write_atomically(digest_path(path), json.dumps({"digest": array_digest(array), "source": source}).encode())


def load_array(path: Path, source: str = "", what: str = "cache", mmap: bool = False) -> np.ndarray | None:
    """The cached array (memory-mapped with `mmap`) if it is whole and was built from `source`; None (with a
    `CacheWarning` when a file was there) when it must be rebuilt."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(digest_path(path).read_text())
        array = np.load(path, mmap_mode="r" if mmap else None)
        problem = None
        if record.get("source", "") != source:
            problem = "was built from other source files"
        elif record.get("digest") != array_digest(array):
            problem = "does not match its digest (damaged)"
    except FileNotFoundError:
        problem = "has no digest (written by an older qreg or cut off)"
    except (OSError, ValueError, EOFError, TypeError, AttributeError) as error:
        problem = f"cannot be read ({type(error).__name__}: {error})"
    if problem is None:
        return array
    warnings.warn(f"{what} {path} {problem}; rebuilding it", CacheWarning, stacklevel=2)
    return None
