"""Scale-out through Lightning's own strategies: DDP on two CPU processes (gloo), rank-zero-only writing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from records.store import read_rows


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_agrees_on_quantizer_state_and_writes_once(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "cli.py", "fit", "--data", "DigitsDataModule", "--model", "ClassificationModule",
        "--quantization.method", "lsq", "--quantization.weight_bits", "4",
        "--trainer", "configs/trainer/ddp_cpu.yaml", "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run),
        "--data.init_args.corrupted_test.corruptions", "[fog]", "--data.init_args.corrupted_test.severities", "[2]",
        "--flatness.enabled", "false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "quantizer state identical on 2 ranks" in output
    rows = read_rows(run / "results.jsonl")
    clean = [r for r in rows if r["corruption"] == "clean" and r["metric"] == "accuracy"]
    assert len(clean) == 1 and len([r for r in rows if r["corruption"] == "fog"]) == 2  # accuracy and loss, once
    epochs = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert len(epochs) == 2  # rank 0 alone writes the per-epoch metrics
