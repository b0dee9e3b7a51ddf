"""Where a resume and an evaluation of a checkpoint go (issue 18 follow-ups).

- `fit --ckpt_path runs/<run>/checkpoints/last.ckpt` without `--trainer.default_root_dir` continues that run in
  its own folder (config.yaml, metrics.jsonl, the same W&B run id), as the interrupted-run message promises; no
  new `runs/` folder. A resume from an earlier checkpoint (`best-*.ckpt`) into the run's own folder is refused
  (it would rewrite the later history) unless `--trainer.default_root_dir` names a new folder; a study cell's
  checkpoint is left to the study.
- `test` / `fit` with the other task's checkpoint (a detector's under the digits classifier config, a
  classifier's under the detector config) ends in one line naming both tasks, status 2, nothing written.

Each case runs `cli.py` in-process and asserts the exit status, that no traceback was printed, and the files
afterwards. One classifier run (one step and one validation batch: last.ckpt and best-0.ckpt) and one detector
run (one step) are shared by the module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

QUIET = ["--trainer.limit_train_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--data.init_args.corrupted_test.corruptions", "[]",
         "--test_after_fit", "false"]
CLASSIFIER = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--flatness.enabled", "false",
              "--quantization.method", "lsq", "--quantization.weight_bits", "4", "--trainer.limit_val_batches", "1",
              *QUIET]
DETECTOR = ["--data", "RectanglesDataModule", "--model", "DetectionModule", "--data.init_args.augment", "false",
            "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
            "--data.init_args.image_size", "64", "--data.init_args.batch_size", "4",
            "--data.init_args.eval_batch_size", "4", "--trainer.limit_val_batches", "0", *QUIET]
RUN = Path("runs") / "digits-20260101-000000"  # relative to the module's folder, where each test runs
CLASSIFICATION = "classification model (ClassificationModule)"
DETECTION = "detection model (DetectionModule)"


def wandb_ids(monkeypatch) -> list[str]:
    """The W&B run ids of the loggers cli.py makes from now on (W&B itself is disabled in the tests)."""
    import callbacks.wandb_logger as module

    ids: list[str] = []

    class Spy(module.ResilientWandbLogger):
        def __init__(self, *args, **kwargs) -> None:
            ids.append(kwargs["id"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(module, "ResilientWandbLogger", Spy)
    return ids


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume-folder")
    with pytest.MonkeyPatch.context() as monkeypatch:
        ids = wandb_ids(monkeypatch)
        assert run_cli("fit", *CLASSIFIER, "--trainer.max_epochs", "1",
                       "--trainer.default_root_dir", str(root / RUN)) == 0
    assert run_cli("fit", *DETECTOR, "--trainer.max_epochs", "1",
                   "--trainer.default_root_dir", str(root / "detector")) == 0
    assert (root / RUN / "checkpoints" / "best-0.ckpt").is_file()
    return {"root": root, "wandb_id": ids[0], "detector": root / "detector" / "checkpoints" / "last.ckpt"}


@pytest.fixture
def here(world, monkeypatch) -> Path:
    """Each test runs in the module's folder, so that a run folder made by default lands in its runs/."""
    monkeypatch.chdir(world["root"])
    return world["root"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "runs").iterdir())


def one_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("qreg:")]
    assert len(lines) == 1 and lines[0].startswith("qreg: error: "), err[-3000:]
    return lines[0]


def epochs(run: Path) -> list[int]:
    from records.run_files import read_epoch_metrics

    return [row["epoch"] for row in read_epoch_metrics(run / "metrics.jsonl")]


def earlier_checkpoint(here: Path) -> Path:
    """The run's best-<epoch>.ckpt (best-0, or best-1 once the resume below improved on it), as a relative path."""
    return next((here / RUN / "checkpoints").glob("best-*.ckpt")).relative_to(here)


# ------------------------------------------------------------------------------------------ resume: where
def test_resume_from_last_continues_in_its_run_folder(world, here, monkeypatch, capsys):
    """The command the SIGTERM / Ctrl-C line tells users to run, without --trainer.default_root_dir."""
    ids = wandb_ids(monkeypatch)
    before = folders(here)
    assert epochs(here / RUN) == [0]
    status = run_cli("fit", *CLASSIFIER, "--trainer.max_epochs", "2",
                     "--ckpt_path", str(RUN / "checkpoints" / "last.ckpt"))
    err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err, err[-3000:]
    assert folders(here) == before  # no new runs/<stem>-<time>/
    assert epochs(here / RUN) == [0, 1]  # its metrics.jsonl goes on
    assert "max_epochs: 2" in (here / RUN / "config.yaml").read_text()  # its config.yaml describes the run now
    assert ids == [world["wandb_id"]]  # the same W&B run resumes
    assert "trainer.max_epochs" in (here / RUN / "resume-changes.yaml").read_text()
    # the best checkpoint is still tracked (the folder was reached by another spelling than the fit's): one
    assert len(list((here / RUN / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.parametrize("explicit", [False, True], ids=["default folder", "its own folder named"])
def test_resume_from_an_earlier_checkpoint_into_its_run_is_refused(explicit, here, capsys):
    best = earlier_checkpoint(here)
    before, runs = snapshot(here), folders(here)
    extra = ["--trainer.default_root_dir", str(RUN)] if explicit else []
    assert run_cli("fit", *CLASSIFIER, "--trainer.max_epochs", "3", "--ckpt_path", str(best), *extra) == 2
    line = one_line(capsys.readouterr().err)
    assert f"resuming {best} in its own run folder" in line and "would rewrite that run's later history" in line
    assert f"continue the run from {RUN / 'checkpoints' / 'last.ckpt'}" in line and "--trainer.default_root_dir" in line
    assert snapshot(here) == before and folders(here) == runs  # nothing written, no folder made


def test_resume_from_an_earlier_checkpoint_into_a_new_folder_goes_on(here, capsys):
    best = earlier_checkpoint(here)
    run_before, new = snapshot(here / RUN), here / "branch"
    assert run_cli("fit", *CLASSIFIER, "--trainer.max_epochs", "3", "--ckpt_path", str(best),
                   "--trainer.default_root_dir", str(new)) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert snapshot(here / RUN) == run_before  # the run it branched from untouched
    assert (new / "config.yaml").is_file() and (new / "checkpoints" / "last.ckpt").is_file()
    assert (new / "metrics.jsonl").is_file()


def test_resume_of_a_study_cell_without_a_folder_is_left_to_the_study(here, capsys):
    cell = here / "study" / "cells" / "lsq-w4a4-seed0"
    if not cell.exists():
        shutil.copytree(here / RUN, cell)
        (cell / ".cell.lock").touch()
    before, runs = snapshot(here), folders(here)
    ckpt = cell.relative_to(here) / "checkpoints" / "last.ckpt"
    assert run_cli("fit", *CLASSIFIER, "--trainer.max_epochs", "3", "--ckpt_path", str(ckpt)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"is study cell {cell.relative_to(here)}'s: resume the study" in line, line
    assert snapshot(here) == before and folders(here) == runs


# ------------------------------------------------------------------------------------ the other task's checkpoint
OTHER_TASK = {
    # case -> (subcommand, checkpoint, config, the checkpoint's task, the config's)
    "test: detector checkpoint, digits config": ("test", "detector", "digits_resnet20_lsq4.yaml", DETECTION,
                                                 CLASSIFICATION),
    "test: classifier checkpoint, detector config": ("test", "classifier", "yolo_voc_fp32.yaml", CLASSIFICATION,
                                                     DETECTION),
    "fit: detector checkpoint, digits config": ("fit", "detector", "digits_resnet20_fp32.yaml", DETECTION,
                                                CLASSIFICATION),
}


@pytest.mark.parametrize("case", list(OTHER_TASK))
def test_the_other_tasks_checkpoint_names_both_tasks(case, world, here, capsys):
    subcommand, checkpoint, config, trained, configured = OTHER_TASK[case]
    ckpt = world["detector"] if checkpoint == "detector" else here / RUN / "checkpoints" / "last.ckpt"
    before, runs = snapshot(here), folders(here)
    assert run_cli(subcommand, "--config", str(REPO / "configs" / config), "--ckpt_path", str(ckpt)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{ckpt} is the checkpoint of a {trained} but the config's model is a {configured}" in line, line
    assert f"{subcommand} it with its own run's config" in line, line
    assert snapshot(here) == before and folders(here) == runs  # no config-test.yaml, no run folder
    assert not list(here.rglob("config-test.yaml"))
