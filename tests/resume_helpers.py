"""A fit run as a process, stopped and resumed: what the exact-resume tests (CPU and CUDA) share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import REPO

EPOCHS, BATCHES = 3, 10
ARGS = [
    "fit", "--data", "DigitsDataModule", "--model", "ClassificationModule",
    "--quantization.method", "lsq", "--quantization.weight_bits", "4",
    "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
    "--trainer.limit_val_batches", "1", "--trainer.deterministic", "true",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--data.init_args.corrupted_test.corruptions", "[]", "--flatness.enabled", "false", "--test_after_fit", "false",
]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "cli.py", *ARGS, "--trainer.default_root_dir", str(run_dir), *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, expected: int = 0) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == expected, err[-3000:]


def epochs_written(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_until(condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def epoch_metrics(run_dir: Path) -> dict[int, dict]:
    by_epoch = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_epoch[row["epoch"]] = {k: v for k, v in row.items() if k.startswith(("train/", "val/", "quant"))}
    return by_epoch


def assert_same_run(resumed: Path, reference: Path) -> None:
    ours, theirs = final_state(resumed), final_state(reference)
    assert ours.keys() == theirs.keys()
    assert any("input_quantizer.step" in k for k in ours)  # the fake-quant state is part of the comparison
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"differs: {different[:5]}"
    assert epoch_metrics(resumed) == epoch_metrics(reference)
