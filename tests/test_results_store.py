"""The results store: schema, atomic appends, concurrent writers, and a clear error on a corrupt line."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest

from records.store import FIELDS, ResultsStoreError, append_rows, read_rows

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


def row(**overrides):
    base = dict(run="r", study="s", model="resnet20", dataset="digits", method="lsq", weight_bits=4, act_bits=4,
                seed=0, epoch=11, step=132, split="test", corruption="clean", severity=0, metric="accuracy", value=97.5)
    return {**base, **overrides}


def test_rows_round_trip_in_schema_order(tmp_path):
    path = tmp_path / "results.jsonl"
    assert append_rows(path, [row(), row(metric="loss", value=float("nan"))]) == 2
    rows = read_rows(path)
    assert list(rows[0]) == list(FIELDS)
    assert rows[0]["value"] == 97.5 and math.isnan(rows[1]["value"])
    assert not list(tmp_path.glob("*.tmp"))


def test_rows_outside_the_schema_are_refused(tmp_path):
    with pytest.raises(ResultsStoreError, match="missing \\['value'\\]"):
        append_rows(tmp_path / "r.jsonl", [{k: v for k, v in row().items() if k != "value"}])
    with pytest.raises(ResultsStoreError, match="must be a number"):
        append_rows(tmp_path / "r.jsonl", [row(value="high")])
    assert not (tmp_path / "r.jsonl").exists()


def test_a_corrupt_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "results.jsonl"
    append_rows(path, [row()])
    with open(path, "a") as handle:
        handle.write('{"run": "r", "value": \n')
    with pytest.raises(ResultsStoreError, match="results.jsonl:2 is not a valid results row"):
        read_rows(path)


def _writer(path: str, worker: int, count: int) -> None:
    for i in range(count):
        append_rows(path, [row(run=f"w{worker}", severity=i)])


def test_concurrent_writers_never_lose_or_break_rows(tmp_path):
    path = tmp_path / "results.jsonl"
    workers, count = 4, 15
    processes = [multiprocessing.Process(target=_writer, args=(str(path), w, count)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == workers * count
    keys = {(json.loads(line)["run"], json.loads(line)["severity"]) for line in lines}
    assert keys == {(f"w{w}", i) for w in range(workers) for i in range(count)}
