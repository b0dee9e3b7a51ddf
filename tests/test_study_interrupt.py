"""A study stops when told and recovers from a damaged checkpoint.

- SIGTERM to `cli.py study` mid-cell: the cell saves, the study exits 143 without starting the next cell and
  says how to resume; a rerun resumes that cell and finishes the study with every row exactly once.
- A cell whose last.ckpt was cut off (a node crash mid-write) resumes from its intact best-*.ckpt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from records.store import read_rows

EPOCHS, BATCHES = 6, 4
FAST = ["--trainer.limit_train_batches", str(BATCHES), "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.corrupted_test.corruptions", "[fog]", "--data.init_args.corrupted_test.severities", "[3]",
        "--flatness.enabled", "false"]


def write_study(folder: Path, methods: str, epochs: int = EPOCHS) -> Path:
    study = folder / "study.yaml"
    args = json.dumps(["--trainer.max_epochs", str(epochs), *FAST])
    study.write_text(f"name: tiny\nbase: [{REPO / 'configs' / 'digits_resnet20_fp32.yaml'}]\nmethods: {methods}\n"
                     f"seeds: [0]\noutput_dir: {folder / 'out'}\ncorruption_workers: 1\nargs: {args}\n")
    return study


def row_keys(rows: list[dict]) -> list[tuple]:
    return [(r["run"], r["split"], r["corruption"], r["severity"], r["metric"]) for r in rows]


def epochs_in(metrics: Path) -> list[int]:
    return sorted({json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line.strip()})


@pytest.mark.slow  # 80 s on 2 busy cores: four cell processes
def test_sigterm_stops_the_study_after_the_cell_saves_and_a_rerun_resumes_it(tmp_path):
    study = write_study(tmp_path, "[{method: fp32}, {method: lsq, bits: [4]}]")
    out = tmp_path / "out"
    first_cell, second_cell = out / "cells" / "fp32-seed0", out / "cells" / "lsq-w4a4-seed0"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [sys.executable, "cli.py", "study", "--config", str(study), "--report", "false"]
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (first_cell / "checkpoints" / "last.ckpt").exists():
        assert runner.poll() is None, runner.communicate()
        time.sleep(0.05)
    runner.send_signal(signal.SIGTERM)  # to the runner only: it forwards the signal to its cell
    stdout, stderr = runner.communicate(timeout=300)

    assert runner.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("qreg: study stopped: cell fp32-seed0 was interrupted") and "Resume with:" in last, last
    assert "interrupted" in stdout and "failed" not in stdout
    assert not second_cell.exists()  # the next cell never started
    stopped_at = torch.load(first_cell / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert stopped_at["global_step"] < EPOCHS * BATCHES  # saved mid-run, by the forwarded SIGTERM
    assert not (out / "results.jsonl").exists() or not read_rows(out / "results.jsonl")

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fp32-seed0 (resuming from its checkpoint last.ckpt)" in done.stdout
    keys = row_keys(read_rows(out / "results.jsonl"))
    assert len(keys) == len(set(keys))  # every row exactly once
    for run in ("fp32-seed0", "lsq-w4a4-seed0"):
        tested = {(c, s) for r, split, c, s, m in keys if r == run and split == "test" and m == "accuracy"}
        assert tested == {("clean", 0), ("fog", 3)}
    assert epochs_in(first_cell / "metrics.jsonl") == list(range(EPOCHS))
    final = torch.load(first_cell / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == EPOCHS * BATCHES


def test_a_truncated_last_ckpt_resumes_from_best(tmp_path, capsys):
    epochs = 3
    study = write_study(tmp_path, "[{method: fp32}]", epochs=epochs)
    cell = tmp_path / "out" / "cells" / "fp32-seed0"
    # The cell as a crash leaves it: two epochs trained, no test rows, last.ckpt cut off mid-write.
    assert run_cli("fit", "--config", str(REPO / "configs" / "digits_resnet20_fp32.yaml"), *FAST,
                   "--trainer.max_epochs", "2", "--test_after_fit", "false",
                   "--trainer.default_root_dir", str(cell)) == 0
    (cell / ".cell.lock").touch()
    last = cell / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    best = sorted((cell / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    best_step = torch.load(best[0], weights_only=False, map_location="cpu")["global_step"]
    capsys.readouterr()

    assert run_cli("study", "--config", str(study), "--report", "false") == 0
    printed = capsys.readouterr().out
    assert f"last.ckpt did not load; resuming from {best[0].name}" in printed
    assert (cell / "checkpoints" / "last.ckpt.damaged").is_file()  # kept for inspection, never read again
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    keys = row_keys(rows)
    assert len(keys) == len(set(keys)) and {r["step"] for r in rows} == {epochs * BATCHES}
    assert best_step < epochs * BATCHES
    assert epochs_in(cell / "metrics.jsonl") == list(range(epochs))
