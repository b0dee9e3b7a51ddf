"""A study cell is what its config says: the identity of a cell is its fully resolved `cli.py fit` config.

Before a study runs anything, each cell's config is resolved as its fit would parse it
(`app.lightning_cli.resolve_fit_config`: a parse, no data, no model) and compared with the config the cell's folder
was trained with (its `config.yaml`, written by the fit; else the `cell.json` the runner wrote when the cell
started). Keys that do not change what a cell trains or tests (`callbacks.resume_changes.BOOKKEEPING`) are left out;
every other key is the cell's identity, and its digest (sha256 of the canonical JSON, 12 hex characters) is recorded
in `<cell>/cell.json` beside the compared config.

The study folder records the study it belongs to in `<study>/study.json`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from callbacks.resume_changes import BOOKKEEPING
from records.store import write_atomically
from study.layout import CELL_FILE, STUDY_FILE

# Mappings whose keys are the user's (module-name patterns -> bits): compared whole, never key by key.
LEAF_MAPS = ("quantization.layer_bits",)
SHOWN = 3  # differing keys named per cell before "and N more"
MISSING = object()


def _ignored(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in BOOKKEEPING)  # never what a cell trains or tests


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def compared_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config without its ignored keys: what a cell's identity is made of."""
    kept: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _ignored(name):
            continue
        kept[str(key)] = (compared_config(value, f"{name}.") if isinstance(value, dict) and name not in LEAF_MAPS
                          else _plain(value))
    return kept


def digest(compared: dict[str, Any]) -> str:
    """12 hex characters of the sha256 of the compared config's canonical JSON."""
    text = json.dumps(compared, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every compared key whose value differs, in the new config's order.

    A key only one side has is left out (an option a later qreg added or dropped, whose default keeps the run what
    it was), except inside the user's own mappings (`LEAF_MAPS`), compared whole; a changed class is one
    difference (its `class_path`), not a list of its arguments'."""
    found: list[tuple[str, Any, Any]] = []
    if old.get("class_path", MISSING) != new.get("class_path", MISSING):
        return [(f"{prefix}class_path", old.get("class_path"), new.get("class_path"))]
    for key, after in new.items():
        name = f"{prefix}{key}"
        if key not in old or _ignored(name):
            continue
        before = old[key]
        if isinstance(before, dict) and isinstance(after, dict) and name not in LEAF_MAPS:
            found += differences(before, after, f"{name}.")
        elif not _same(before, after):
            found.append((name, before, after))
    return found


def resumable(key: str) -> bool:
    """A change that a resume continues with, without asking (callbacks/resume_changes.py ignores or records it:
    a longer run, other test splits, ...): an interrupted cell resumes with it, and the finished cell is then what
    its config says (its fit rewrites config.yaml and records the change in resume-changes.yaml)."""
    from callbacks.resume_changes import IGNORED, RECORDED

    return any(fnmatch.fnmatchcase(key, pattern) for pattern in (*IGNORED, *RECORDED))


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # 1 == 1.0, but true is not 1


def show(value: Any) -> str:
    text = json.dumps(value, default=str) if value is None or isinstance(value, list | dict | bool) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(found: list[tuple[str, Any, Any]]) -> str:
    """'data.init_args.corrupted_test.corruptions ["fog"] -> ["snow"]; ...' (the first SHOWN keys)."""
    text = "; ".join(f"{key} {show(before)} -> {show(after)}" for key, before, after in found[:SHOWN])
    return text + (f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else "")


def recorded_config(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The compared config a cell folder was run with, and the file it comes from: its `config.yaml` (what its fit
    ran with), else the `cell.json` the runner wrote when it started it; (None, "") when neither can be read."""
    path = folder / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(config, dict):
            return compared_config(config), str(path)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        pass
    path = folder / CELL_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            return record["config"], str(path)
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return None, ""


def write_cell_record(folder: Path, cell: str, study: str, compared: dict[str, Any]) -> None:
    """`<cell>/cell.json`: the digest and compared config of the config the cell is being run with."""
    record = {"cell": cell, "study": study, "digest": digest(compared),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "config": compared}
    write_atomically(folder / CELL_FILE, (json.dumps(record, indent=1, default=str) + "\n").encode())


def study_of(directory: Path) -> str | None:
    """The study name `<study>/study.json` records; None without the file. An unreadable file is an error."""
    from study.grid import StudyError

    path = directory / STUDY_FILE
    if not path.exists():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError) as error:
        raise StudyError(f"{path} cannot be read ({error}); it names the study this folder belongs to: fix it, "
                         "or give the study a new output_dir") from None
    if not isinstance(name, str) or not name:
        raise StudyError(f"{path} names no study (no \"name\"); fix it, or give the study a new output_dir")
    return name


def write_study_record(directory: Path, name: str) -> None:
    write_atomically(directory / STUDY_FILE, (json.dumps({"name": name}) + "\n").encode())
