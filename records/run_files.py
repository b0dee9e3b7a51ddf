"""A run's own files beside the results store: `metrics.jsonl` (one line per epoch) and `predictions.npz`
(per-image correctness of every test split), written by the results callback and read by the report.

`metrics.jsonl` rather than Lightning's CSVLogger: a resumed run rewrites a CSV header from the new process's
keys and duplicates the epochs replayed after the last checkpoint. Here readers keep the last line written for
each epoch, so a resumed run simply supersedes what it replays. Both files are written atomically (temporary
file, fsync, rename), so a reader finding a malformed one names it instead of guessing.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from records.store import ResultsStoreError, json_lines, locked, write_atomically

METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.npz"


class RunFileError(ResultsStoreError):
    """A run's metrics or predictions file that cannot be read, or that contradicts the results store."""


def append_epoch_metrics(path: str | Path, row: dict[str, Any]) -> None:
    """Append one epoch's line (the whole file is rewritten atomically under the file's lock)."""
    path = Path(path)
    with locked(path):
        existing = path.read_bytes() if path.exists() else b""
        write_atomically(path, existing + (json.dumps(row) + "\n").encode())


def read_epoch_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file, one per epoch (the last line written wins), sorted by epoch.

    A line that is not a JSON object with an integer epoch (e.g. cut off by a full disk or an editor) is an
    error naming the file and the line."""
    def epoch_of(row: dict) -> tuple[int, dict]:
        if isinstance(row.get("epoch"), bool):
            raise ValueError("its epoch is not a number")
        return int(row["epoch"]), row

    by_epoch = dict(json_lines(Path(path), epoch_of, "epoch line", RunFileError))  # the last line wins
    return [by_epoch[e] for e in sorted(by_epoch)]


def save_predictions(path: str | Path, correct: dict[str, Any]) -> None:
    """Per-image correctness by split, bit-packed: what the report's paired bootstrap resamples."""
    buffer = io.BytesIO()
    arrays = {name.replace("/", "__"): np.packbits(np.asarray(v, dtype=bool)) for name, v in correct.items()}
    sizes = {f"size__{key}": np.array(len(v)) for key, v in zip(arrays, correct.values(), strict=True)}
    np.savez_compressed(buffer, **arrays, **sizes)
    write_atomically(Path(path), buffer.getvalue())


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """The inverse of save_predictions: split name -> bool array; a truncated or foreign file is an error
    naming it."""
    path = Path(path)
    try:
        with np.load(path) as data:
            keys = [key for key in data.files if not key.startswith("size__")]
            loaded = {}
            for key in keys:
                size = int(data[f"size__{key}"])
                bits = np.unpackbits(data[key])
                if not 0 <= size <= len(bits):
                    raise ValueError(f"split {key} claims {size} images but holds {len(bits)} bits")
                loaded[key.replace("__", "/")] = bits[:size].astype(bool)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise RunFileError(f"{path} is not a readable predictions file ({type(error).__name__}: {error}); "
                           "delete it and rerun the cell's test to rewrite it") from None
    return loaded


def check_predictions(path: str | Path, predictions: dict[str, np.ndarray], scores: dict[str, float]) -> None:
    """Raise RunFileError if a cell's predictions do not belong to its results rows: other split names, splits
    of different sizes, or a split whose accuracy is not the score in the store (to 0.01 points)."""
    if set(predictions) != set(scores):
        missing, extra = sorted(set(scores) - set(predictions)), sorted(set(predictions) - set(scores))
        raise RunFileError(f"{path} does not match its cell's results: splits missing {missing[:3]}, extra "
                           f"{extra[:3]}; delete it and rerun the cell's test")
    sizes = {len(v) for v in predictions.values()}
    if len(sizes) > 1:
        raise RunFileError(f"{path} holds splits of different sizes {sorted(sizes)}; every split of a test set "
                           "has the same images: delete it and rerun the cell's test")
    for name, correct in predictions.items():
        accuracy = 100.0 * float(np.mean(correct)) if len(correct) else float("nan")
        if not abs(accuracy - scores[name]) <= 0.01:
            raise RunFileError(f"{path} gives split {name} an accuracy of {accuracy:.2f} but the results store "
                               f"{scores[name]:.2f}: delete it and rerun the cell's test")
