"""Reliability cases a new (or hostile) user runs into, table-driven, one class each of issue 14.

Each case prepares its input from one shared tiny trained run (module fixture), runs `cli.py` in-process and
asserts the exit status, that no traceback was printed (and, for a refusal, exactly one `qreg: error` line
naming the file or option), that the shared files are untouched, and its own file state afterwards (no
partial file, the study's records unchanged, the cache rebuilt).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import user_error
from app.run_folder import default_run_dir
from conftest import REPO, run_cli
from datamodules.array_cache import digest_path
from datamodules.cifar import CIFAR10_CLASSES
from records.store import read_rows

BASE = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--flatness.enabled", "false", "--data.init_args.corrupted_test.corruptions", "[]"]
LSQ4 = ["--quantization.method", "lsq", "--quantization.weight_bits", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """One finished LSQ W4A4 run (two epochs: last.ckpt and best-*.ckpt), and a study holding it as a cell."""
    root = tmp_path_factory.mktemp("reliability")
    run = root / "run"
    assert run_cli("fit", *BASE, *LSQ4, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(run)) == 0
    study = root / "study"
    cell = study / "cells" / "lsq-w4a4-seed0"
    shutil.copytree(run, cell)
    (cell / ".cell.lock").touch()
    shutil.copy(run / "results.jsonl", study / "results.jsonl")
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "study": study}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partial_files(folder: Path) -> None:
    if folder.exists():
        leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------- inputs
def damaged_checkpoint(kind: str):
    def make(w, tmp: Path) -> Path:
        path = tmp / f"{kind}.ckpt"
        good = w["ckpt"].read_bytes()
        if kind == "truncated":
            path.write_bytes(good[: len(good) // 2])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "zeros":
            path.write_bytes(bytes(len(good)))
        elif kind == "yaml":
            path.write_text("trainer:\n  max_epochs: 3\n")
        elif kind == "directory":
            path.mkdir()
        elif kind == "foreign":  # a Lightning-style file that no qreg run wrote: no spec, no position
            torch.save({"state_dict": {}}, path)
        elif kind == "unknown_hparam":
            checkpoint = torch.load(w["ckpt"], weights_only=False, map_location="cpu")
            checkpoint["hyper_parameters"]["bogus_option"] = 1
            torch.save(checkpoint, path)
        return path
    return make


def evaluate_with(kind: str):
    def command(w, tmp):
        return ["test", *BASE, *LSQ4, "--ckpt_path", str(damaged_checkpoint(kind)(w, tmp)),
                "--trainer.default_root_dir", str(tmp / "out")]
    return command


def fit_with(*extra: str):
    return lambda w, tmp: ["fit", *BASE, "--trainer.default_root_dir", str(tmp / "out"), *extra]


def config_file(text: str, nested: dict[str, str] | None = None):
    def command(w, tmp):
        for name, body in (nested or {}).items():
            (tmp / name).write_text(body)
        (tmp / "config.yaml").write_text(text)
        return ["fit", "--config", str(tmp / "config.yaml"), *BASE, "--trainer.default_root_dir", str(tmp / "out")]
    return command


def image_folder(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                # uncompressed: every image file has the same size, as a same-size replacement needs
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png", compress_level=0)
    return root


def corrupt_images(root: Path, cache: Path) -> list[str]:
    return ["corrupt", "--data", "CIFAR10DataModule", "--data.init_args.root", str(root),
            "--data.init_args.val_size", "2", "--data.init_args.corrupted_test.corruptions", "[fog]",
            "--data.init_args.corrupted_test.severities", "[3]", "--cache_dir", str(cache), "--workers", "1"]


def cached_run(tmp: Path) -> tuple[Path, Path]:
    """An image folder whose caches exist (a first `corrupt` ran): (image root, corruption cache folder)."""
    root, cache = image_folder(tmp / "images"), tmp / "corrupted"
    assert run_cli(*corrupt_images(root, cache)) == 0
    return root, cache


def damage_decoded_cache(how: str):
    def command(w, tmp):
        root, cache = cached_run(tmp)
        target = next((root / ".qreg-cache").glob("test-*.npy"))
        if how == "truncated":
            target.write_bytes(target.read_bytes()[:300])
        else:  # an image replaced by another of the same size, its time kept: the old pixels must not be served
            image = root / "test" / "cat" / "0.png"
            stat = image.stat()
            Image.open(root / "test" / "dog" / "0.png").copy().save(image, compress_level=0)
            os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            assert image.stat().st_size == stat.st_size
        return corrupt_images(root, cache)
    return command


def decoded_cache_rebuilt(w, tmp):
    from datamodules.cifar import load_image_folder

    images, labels = load_image_folder(tmp / "images" / "test", list(CIFAR10_CLASSES))
    cat = images[np.flatnonzero(labels == CIFAR10_CLASSES.index("cat"))[0]]
    assert np.array_equal(cat, np.asarray(Image.open(tmp / "images" / "test" / "cat" / "0.png").convert("RGB")))
    for cache in (tmp / "images" / ".qreg-cache").glob("*.npy"):
        assert digest_path(cache).is_file()


def damage_corruption_cache(how: str):
    def command(w, tmp):
        root, cache = cached_run(tmp)
        split = next(cache.rglob("fog-3.npy"))
        array = np.load(split)
        if how == "zeros":
            np.save(split, np.zeros_like(array))  # a valid header over the wrong pixels
        else:
            split.write_bytes(split.read_bytes()[:500])
        return corrupt_images(root, cache)
    return command


def corruption_cache_rebuilt(w, tmp):
    split = next((tmp / "corrupted").rglob("fog-3.npy"))
    array = np.load(split)
    assert array.shape[0] == 20 and array.any()


def evaluate_cell(extra: tuple[str, ...] = ()):
    def command(w, tmp):
        study = tmp / "study"
        shutil.copytree(w["study"], study)
        ckpt = study / "cells" / "lsq-w4a4-seed0" / "checkpoints" / "last.ckpt"
        return ["test", *BASE, *LSQ4, "--ckpt_path", str(ckpt), *(a.format(cell=ckpt.parent.parent) for a in extra)]
    return command


def cell_records_unchanged(w, tmp):
    study = tmp / "study"
    original, copy = snapshot(w["study"]), snapshot(study)
    theirs = {k.replace(str(w["study"]), str(study)): v for k, v in original.items()}
    changed = [k for k in copy if k in theirs and copy[k] != theirs[k]]
    assert not changed, changed  # neither the cell's files nor the study's store


def evaluation_in_its_own_folder(w, tmp):
    cell_records_unchanged(w, tmp)
    evaluations = list((tmp / "study" / "evaluations").iterdir())
    assert len(evaluations) == 1 and evaluations[0].name.startswith("lsq-w4a4-seed0-last-")
    assert read_rows(evaluations[0] / "results.jsonl") and (evaluations[0] / "predictions.npz").is_file()


def study_with_spaces(w, tmp):
    folder = tmp / "my study"
    folder.mkdir()
    (folder / "s.yaml").write_text(f"name: a b\nbase: ['{REPO / 'configs' / 'digits_resnet20_fp32.yaml'}']\n"
                                   f"methods: [{{method: fp32}}]\noutput_dir: '{folder / 'out dir'}'\n")
    return ["study", "--config", str(folder / "s.yaml"), "--executor", "slurm"]


def slurm_scripts_quoted(w, tmp):
    script = (tmp / "my study" / "out dir" / "slurm" / "cells.sbatch").read_text()
    assert '#SBATCH --job-name="qreg-a b"' in script
    assert f'#SBATCH --output="{tmp / "my study" / "out dir" / "slurm"}/cell-%a-%A.out"' in script
    for name in ("cells.sbatch", "report.sbatch", "submit.sh"):
        subprocess.run(["bash", "-n", str(tmp / "my study" / "out dir" / "slurm" / name)], check=True)


def cache_file_untouched(w, tmp):
    assert (tmp / "c").is_file() and (tmp / "c").stat().st_size == 0
    assert sorted(p.name for p in tmp.iterdir()) == ["c"]  # no cache folder, split or temporary file beside it


def nothing_written(w, tmp):
    out = tmp / "out"
    assert not (out / "results.jsonl").exists() and not (out / "checkpoints").exists()
    assert not (out / "config.yaml").exists()
    no_partial_files(tmp)


# name: (command, expected status, text of the one error line (None: exit 0), check of the files afterwards)
CASES = {
    # checkpoints handed to test / fit
    "test: truncated checkpoint": (evaluate_with("truncated"), 2, "cannot be loaded", nothing_written),
    "test: empty checkpoint": (evaluate_with("empty"), 2, "empty.ckpt cannot be loaded", nothing_written),
    "test: checkpoint of zeros": (evaluate_with("zeros"), 2, "zeros.ckpt cannot be loaded", nothing_written),
    "test: a YAML file as checkpoint": (evaluate_with("yaml"), 2, "yaml.ckpt cannot be loaded", nothing_written),
    "test: a directory as checkpoint": (evaluate_with("directory"), 2, "directory.ckpt is not a file", nothing_written),
    "test: a checkpoint qreg did not write": (evaluate_with("foreign"), 2, "lacks epoch, global_step", nothing_written),
    "test: unknown hyperparameter": (evaluate_with("unknown_hparam"), 2,
                                     "does not accept: bogus_option", nothing_written),
    "fit: resume from a truncated checkpoint": (
        lambda w, tmp: fit_with("--ckpt_path", str(damaged_checkpoint("truncated")(w, tmp)))(w, tmp), 2,
        "truncated.ckpt cannot be loaded", nothing_written),
    "fit: resume from a missing checkpoint": (fit_with("--ckpt_path", "/nonexistent/last.ckpt"), 2,
                                              "/nonexistent/last.ckpt does not exist", nothing_written),
    # runs that would train nothing
    "fit: max_epochs 0": (fit_with("--trainer.max_epochs", "0"), 2, "max_epochs 0 trains nothing", nothing_written),
    "fit: max_steps 0": (fit_with("--trainer.max_steps", "0"), 2, "max_steps 0 trains nothing", nothing_written),
    "fit: limit_train_batches 0": (fit_with("--trainer.limit_train_batches", "0"), 2, "trains nothing",
                                   nothing_written),
    "fit: training set smaller than a batch": (fit_with("--data.init_args.batch_size", "4096"), 2,
                                               "make no full batch", nothing_written),
    # config files
    "fit: a key twice in --config": (config_file("quantization:\n  method: lsq\nquantization:\n  method: fp32\n"), 2,
                                     "sets 'quantization' twice (lines 1 and 3)", nothing_written),
    "fit: a key twice in a composed file": (
        config_file("quantization: q.yaml\n", {"q.yaml": "method: lsq\nweight_bits: 4\nweight_bits: 2\n"}), 2,
        "q.yaml sets 'weight_bits' twice", nothing_written),
    # optimizer and trainer options
    "fit: negative learning rate": (fit_with("--model.init_args.lr", "-0.1"), 2, "model.init_args.lr must be",
                                    nothing_written),
    "fit: negative weight decay": (fit_with("--model.init_args.weight_decay", "-1"), 2, "weight_decay must be",
                                   nothing_written),
    "fit: NaN learning rate": (fit_with("--model.init_args.lr", "nan"), 2,
                               "model.init_args.lr: expected a float, got nan", nothing_written),
    "fit: negative momentum": (fit_with("--model.init_args.momentum", "-0.5"), 2, "momentum must be",
                               nothing_written),
    "fit: accelerator gpu without one": (fit_with("--trainer.accelerator", "gpu"), 2, "trainer:", nothing_written),
    # file system
    "fit: run folder is a file": (
        lambda w, tmp: ["fit", *BASE, "--trainer.default_root_dir", str(Path(tmp / "file").touch() or tmp / "file")],
        2, "is not a directory", lambda w, tmp: no_partial_files(tmp)),
    "fit: run folder inside a file": (
        lambda w, tmp: ["fit", *BASE, "--trainer.default_root_dir", str(Path(tmp / "f").touch() or tmp / "f" / "r")],
        2, "is not a directory", lambda w, tmp: no_partial_files(tmp)),
    "corrupt: cache_dir is a file": (
        lambda w, tmp: ["corrupt", "--data", "DigitsDataModule", "--data.init_args.corrupted_test.corruptions",
                        "[fog]", "--data.init_args.corrupted_test.severities", "[1]",
                        "--cache_dir", str(Path(tmp / "c").touch() or tmp / "c")], 2, "c/cifar-seed0",
        cache_file_untouched),
    "corruption-grid: a 4x4 image": (
        lambda w, tmp: ["corruption-grid", str(Image.new("RGB", (4, 4)).save(tmp / "t.png") or tmp / "t.png"),
                        "--out", str(tmp / "g.png")], 2, "t.png is 4x4 pixels",
        lambda w, tmp: not (tmp / "g.png").exists() or pytest.fail("grid written")),
    # evaluations of a study's cell
    "test: a study cell's checkpoint gets its own folder": (evaluate_cell(), 0, None, evaluation_in_its_own_folder),
    "test: into a study cell's folder is refused": (
        evaluate_cell(("--trainer.default_root_dir", "{cell}")), 2, "is a study cell's folder",
        cell_records_unchanged),
    # caches: damaged or stale ones are rebuilt with a warning, never served, never fatal
    "decoded-image cache truncated": (damage_decoded_cache("truncated"), 0, None, decoded_cache_rebuilt),
    "image replaced, same size and time": (damage_decoded_cache("replaced"), 0, None, decoded_cache_rebuilt),
    "corrupted split of zeros behind a valid header": (damage_corruption_cache("zeros"), 0, None,
                                                       corruption_cache_rebuilt),
    "corrupted split truncated": (damage_corruption_cache("truncated"), 0, None, corruption_cache_rebuilt),
    # generated SLURM scripts
    "study --executor slurm with spaces in paths": (study_with_spaces, 0, None, slurm_scripts_quoted),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reliability_case(name, world, tmp_path, capsys, monkeypatch):
    if name.endswith("without one") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    command, status, message, check = CASES[name]
    monkeypatch.chdir(tmp_path)  # a default run folder (runs/...) lands here
    args = command(world, tmp_path)
    before = snapshot(world["root"])
    capsys.readouterr()
    assert run_cli(*args) == status, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    if message is not None:
        lines = [line for line in err.splitlines() if line.startswith("qreg: error")]
        assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert snapshot(world["root"]) == before  # the shared run and study are untouched
    check(world, tmp_path)


# ------------------------------------------------------------------------- cases outside the table
def mounted_tmpfs(folder: Path, options: str):
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    folder = mounted_tmpfs(tmp_path / "disk", "size=1m")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    folder = mounted_tmpfs(tmp_path / "ro", "ro,size=1m")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_disk_full_while_writing_a_checkpoint_is_exit_2_and_leaves_no_partial_file(small_disk, capsys):
    """A 1 MiB file system holds the run's config and metrics but not its 2 MB checkpoint."""
    run = small_disk / "run"
    capsys.readouterr()
    assert run_cli("fit", *BASE, "--trainer.default_root_dir", str(run)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qreg: error")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert "No space left on device" in lines[0] and "checkpoint" in lines[0], lines[0]
    assert not list(small_disk.rglob("*.ckpt")) and not list(small_disk.rglob("*.tmp"))
    assert not (run / "results.jsonl").exists()


def test_read_only_run_folder_is_refused_before_anything_runs(read_only_disk, capsys):
    capsys.readouterr()
    assert run_cli("fit", *BASE, "--trainer.default_root_dir", str(read_only_disk / "run")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "read-only file system" in err.strip().splitlines()[-1], err[-2000:]


def test_ctrl_c_in_the_first_epoch_saves_last_ckpt_and_exits_130(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "cli.py", "fit", *BASE, "--trainer.max_epochs", "3",
               "--trainer.limit_train_batches", "200", "--data.init_args.batch_size", "8",
               "--test_after_fit", "false", "--trainer.default_root_dir", str(run)]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "config.yaml").exists():  # written when fit starts
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by Ctrl-C" in err
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] < 200  # saved in the first epoch


def test_fits_started_in_the_same_second_get_distinct_run_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000000")
    config = {"config": ["configs/digits_resnet20_lsq4.yaml"], "ckpt_path": None}
    first, second = default_run_dir(config, "fit"), default_run_dir(config, "fit")
    assert first != second and Path(first).is_dir() and Path(second).is_dir()


def test_only_errors_about_files_the_user_named_are_user_errors(tmp_path):
    named = str(tmp_path / "data" / "x")
    ours = FileNotFoundError(2, "No such file or directory", str(tmp_path / "data" / "x" / "a.png"))
    internal = FileNotFoundError(2, "No such file or directory", f"/usr/lib/{uuid.uuid4().hex}/module.py")
    assert user_error(ours, ["fit", "--data.init_args.root", named]) is not None
    assert user_error(internal, ["fit", "--data.init_args.root", named]) is None  # a bug keeps its traceback
    full = OSError(28, "No space left on device", "/anywhere/file")
    assert "No space left" in str(user_error(full, []))
    # a bug raised while a user's missing file was being handled is still a bug
    try:
        try:
            raise ours
        except FileNotFoundError:
            raise AttributeError("'NoneType' object has no attribute 'images'")  # noqa: B904
    except AttributeError as bug:
        assert user_error(bug, ["fit", "--data.init_args.root", named]) is None
    # a file missing from the runs folder is qreg's doing; a permission error there is the user's to fix
    missing_run_file = FileNotFoundError(2, "No such file or directory", os.path.abspath("runs/x/metrics.jsonl"))
    assert user_error(missing_run_file, ["fit"]) is None
    denied = PermissionError(13, "Permission denied", os.path.abspath("runs/x"))
    assert user_error(denied, ["fit"]) is not None


def test_testing_over_many_splits_shows_one_bar_with_the_split_and_the_time_left(digits_fast_args, tmp_path,
                                                                                 capsys):
    from rich.progress import TimeRemainingColumn

    from callbacks.progress import SplitsProgressBar

    bar = SplitsProgressBar(leave=True)
    assert any(isinstance(c, TimeRemainingColumn) for c in bar.configure_columns(None))
    args = [*digits_fast_args, "--trainer.enable_progress_bar", "true",
            "--data.init_args.corrupted_test.corruptions", "[fog, snow]",
            "--data.init_args.corrupted_test.severities", "[1]", "--test_after_fit", "true"]
    capsys.readouterr()
    assert run_cli("fit", *args) == 0
    out = capsys.readouterr().out
    assert "Testing snow/1 (split 3/3)" in out, out[-3000:]
    assert "Testing clean (split 1/3)" not in out.split("Testing snow/1")[-1]  # one bar, renamed, not three
