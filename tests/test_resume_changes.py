"""Resume never changes a run silently (issue 18, item 3).

`fit --ckpt_path` with a config that differs from the checkpoint's run is refused in one line naming the keys,
with both values, before anything is written; `--resume_changes allow` continues with the new values (a new
learning rate reaches the restored optimizer) and records them in `resume-changes.yaml`; extending
`max_epochs` needs no flag but is recorded. A fit without --ckpt_path into a folder that holds a run is refused
before the logger (and W&B) starts, the folder untouched.

One tiny LSQ W4A4 run (one epoch of two batches) is shared; a test that trains resumes a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.run_folder import continued_in_place, refuse_existing_run
from callbacks.resume_changes import CHANGES_FILE
from conftest import run_cli
from datamodules.cifar import CIFAR10_CLASSES

BASE = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--flatness.enabled", "false", "--data.init_args.corrupted_test.corruptions", "[]", "--test_after_fit", "false"]
LSQ4 = ["--quantization.method", "lsq", "--quantization.weight_bits", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """One finished LSQ W4A4 run of one epoch (lr 0.1)."""
    run = tmp_path_factory.mktemp("resume-changes") / "run"
    assert run_cli("fit", *BASE, *LSQ4, "--trainer.default_root_dir", str(run)) == 0
    return run


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume(run: Path, *extra: str) -> list[str]:
    return ["fit", *BASE, "--trainer.default_root_dir", str(run), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            *extra]


def refused(capsys, command: list[str]) -> str:
    """Runs a command that must be refused: exit 2, no traceback, one error line (returned)."""
    capsys.readouterr()
    assert run_cli(*command) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("qreg: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    return errors[0]


def copy_of(world: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world, run)
    return run


def epoch_rows(run: Path) -> dict[int, dict]:
    return {row["epoch"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_fp32_config_on_an_lsq_checkpoint_is_refused(world, capsys):
    before = snapshot(world)
    line = refused(capsys, resume(world))  # no quantization options: the FP32 default
    assert "quantization.method (checkpoint lsq, now fp32)" in line and "lsq W4A4" in line, line
    assert "--resume_changes allow" not in line  # no flag can make LSQ weights an FP32 run
    assert snapshot(world) == before  # config.yaml (method: lsq) and the checkpoint untouched
    assert yaml.safe_load((world / "config.yaml").read_text())["quantization"]["method"] == "lsq"


def image_folder(root: Path) -> Path:
    """A CIFAR-10-style ImageFolder: one 32x32 image per class and split."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / "0.png")
    return root


def test_a_digits_checkpoint_on_cifar10_is_refused(world, tmp_path, capsys):
    before = snapshot(world)
    images = image_folder(tmp_path / "cifar10")
    line = refused(capsys, resume(world, *LSQ4, "--data", "CIFAR10DataModule", "--data.init_args.root", str(images),
                                  "--data.init_args.val_size", "2"))
    assert ("data.class_path (checkpoint datamodules.DigitsDataModule, now datamodules.CIFAR10DataModule)"
            in line), line
    assert "--resume_changes allow" in line, line
    assert snapshot(world) == before


def test_a_new_learning_rate_is_refused_then_honoured_when_allowed(world, tmp_path, capsys):
    run = copy_of(world, tmp_path)
    before = snapshot(run)
    line = refused(capsys, resume(run, *LSQ4, "--model.init_args.lr", "0.3", "--trainer.max_epochs", "2"))
    assert "model.init_args.lr (checkpoint 0.1, now 0.3)" in line and "--resume_changes allow" in line, line
    assert "trainer.max_epochs" not in line  # extending the run is not what is refused
    assert snapshot(run) == before
    old = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    decay = old["optimizer_states"][0]["param_groups"][0]["lr"] / 0.1  # the schedule's decay reached so far

    assert run_cli(*resume(run, *LSQ4, "--model.init_args.lr", "0.3", "--trainer.max_epochs", "2",
                           "--resume_changes", "allow")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "model.init_args.lr (checkpoint 0.1, now 0.3) (accepted by --resume_changes allow)" in err, err[-3000:]
    assert "lr 0.03/0.3, current lr" in err, err[-3000:]  # the LSQ steps' group at quantizer_lr_scale 0.1
    # the optimizer trained epoch 1 at the new lr, at the same point of the schedule
    assert epoch_rows(run)[1]["lr"] == pytest.approx(0.3 * decay)
    new = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert new["epoch"] == 1 and new["hyper_parameters"]["lr"] == 0.3
    rates = {g.get("name", "network"): g["initial_lr"] for g in new["optimizer_states"][0]["param_groups"]}
    assert rates == {"network": 0.3, "lsq_steps": pytest.approx(0.03)}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == 0.3 and "resume_changes" not in config  # the consent is not kept
    [entry] = yaml.safe_load((run / CHANGES_FILE).read_text())
    assert entry["accepted_by"] == "--resume_changes allow" and entry["epoch"] == 0
    assert entry["changes"] == {"trainer.max_epochs": {"checkpoint": 1, "now": 2},
                                "model.init_args.lr": {"checkpoint": 0.1, "now": 0.3}}


def test_extending_max_epochs_needs_no_flag_and_is_recorded(world, tmp_path, capsys):
    run = copy_of(world, tmp_path)
    capsys.readouterr()
    assert run_cli(*resume(run, *LSQ4, "--trainer.max_epochs", "2")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "trainer.max_epochs (checkpoint 1, now 2)" in err, err[-3000:]
    assert sorted(epoch_rows(run)) == [0, 1]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["epoch"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    [entry] = yaml.safe_load((run / CHANGES_FILE).read_text())
    assert entry["accepted_by"] == "allowed without asking"
    assert entry["changes"] == {"trainer.max_epochs": {"checkpoint": 1, "now": 2}}


@pytest.mark.parametrize("case", ["rerun", "another run's checkpoint"])
def test_fit_into_a_folder_holding_a_run_is_refused_before_the_logger(world, tmp_path, capsys, monkeypatch, case):
    def no_logger(*args, **kwargs):
        raise AssertionError("the W&B logger was created")

    monkeypatch.setattr("callbacks.wandb_logger.ResilientWandbLogger", no_logger)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    before = snapshot(world)
    command = ["fit", *BASE, *LSQ4, "--trainer.default_root_dir", str(world)]
    if case == "rerun":
        line = refused(capsys, command)
        assert f"run folder {world} already holds a run" in line, line
        assert f"--ckpt_path {world / 'checkpoints' / 'last.ckpt'}" in line, line
    else:
        other = copy_of(world, tmp_path)
        line = refused(capsys, [*command, "--ckpt_path", str(other / "checkpoints" / "last.ckpt")])
        assert f"run folder {world} holds another run than checkpoint" in line, line
    assert snapshot(world) == before


def test_a_study_cell_or_a_slurm_requeue_may_go_on_in_its_folder(world, tmp_path, monkeypatch):
    """The runner restarts a cell whose checkpoints do not load in the cell's folder; a requeued SLURM job
    continues in its job's folder: neither is a rerun into another run's folder."""
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    cell = tmp_path / "study" / "cells" / "fp32-seed0"
    shutil.copytree(world, cell)
    with pytest.raises(ValueError, match="already holds a run"):
        refuse_existing_run(cell)
    (cell / ".cell.lock").touch()
    assert continued_in_place(cell) == "study cell"
    refuse_existing_run(cell)
    job = copy_of(world, tmp_path)
    (job / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert continued_in_place(job) == "hpc checkpoint"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert continued_in_place(world) == "SLURM requeue"
