"""Shared fixtures: W&B off, quiet Lightning, paths to the optional development data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Lightning attaches a logging handler to sys.stderr when first imported; import it now, outside any test's
# capsys, so the handler does not keep a captured stream that pytest closes after that test.
import lightning.pytorch  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(*args: str) -> int:
    """Run `python cli.py ARGS` in-process and return its exit status."""
    from cli import main

    return main(list(args))


@pytest.fixture
def digits_fast_args(tmp_path) -> list[str]:
    """A digits run that takes seconds: one short epoch, one validation batch."""
    return [
        "--data", "DigitsDataModule",
        "--model", "ClassificationModule",
        "--model.init_args.model", "resnet20",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.corrupted_test.corruptions", "[]",
        "--flatness.enabled", "false",
    ]


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """CIFAR-10 (JPEG ImageFolder) extracted from ../shared/data; skips when it is absent."""
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not available")
    import tarfile

    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root
