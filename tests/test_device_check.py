"""benchmarks/device_check.sh runs end to end without a GPU (`--dry-run`: tiny sizes, CUDA parts skipped)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_device_check_dry_run_prints_and_appends_the_table(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# earlier figures\n")
    docs_before = (REPO / "docs" / "benchmarks.md").read_bytes()
    env = {**os.environ, "PYTHON": sys.executable, "QREG_DEVICE_CHECK_REPORT": str(report), "WANDB_MODE": "disabled"}
    done = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tests collected" in done.stdout  # the CUDA tier is collected, not run
    text = report.read_text()
    assert text.startswith("# earlier figures\n") and "DRY RUN" in text
    for method in ("fp32", "lsq", "pact_dorefa", "dorefa"):
        assert f"| resnet20 | {method} |" in text
    assert "200-epoch ResNet20" in text and "95 CIFAR-10-C splits" in text and "YOLOv5n training" in text
    assert (REPO / "docs" / "benchmarks.md").read_bytes() == docs_before  # a dry run never touches the docs


def test_device_check_refuses_unknown_arguments():
    done = subprocess.run(["bash", "benchmarks/device_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "unknown argument --fast" in done.stderr
