"""Exit paths that ended in a traceback (issue 18, item 5): `export` without `--config`, `export` of a checkpoint
of the other task, a precision qreg does not compute in, and a signal during an export.

Each case runs `cli.py` in-process and asserts the exit status, that no traceback was printed, the one
`qreg: ...` line, and the files afterwards: nothing written, no hidden `.tmp` file left, the shared runs
untouched.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)

os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

QUIET = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.corrupted_test.corruptions", "[]", "--test_after_fit", "false"]
CLASSIFIER = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--flatness.enabled", "false", *QUIET]
DETECTOR = ["--data", "RectanglesDataModule", "--model", "DetectionModule", "--data.init_args.augment", "false",
            "--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.test_size", "4",
            "--data.init_args.image_size", "64", "--data.init_args.batch_size", "4",
            "--data.init_args.eval_batch_size", "4", *QUIET]
LSQ4_CONFIG = str(REPO / "configs" / "digits_resnet20_lsq4.yaml")
FP32_CONFIG = str(REPO / "configs" / "digits_resnet20_fp32.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A classifier (digits ResNet20, LSQ W4A4) and a detector (YOLOv5n on 64 px rectangles, FP32) checkpoint,
    each from `cli.py fit` of one training step (no validation: seconds)."""
    root = tmp_path_factory.mktemp("exit-paths")
    assert run_cli("fit", *CLASSIFIER, "--quantization.method", "lsq", "--quantization.weight_bits", "4",
                   "--trainer.default_root_dir", str(root / "classifier")) == 0
    assert run_cli("fit", *DETECTOR, "--trainer.default_root_dir", str(root / "detector")) == 0
    return {"root": root, "classifier": root / "classifier" / "checkpoints" / "last.ckpt",
            "detector": root / "detector" / "checkpoints" / "last.ckpt"}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def one_line(err: str, prefix: str = "qreg: error") -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("qreg:")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------ export
def test_export_without_config_needs_the_data_and_says_so(world, tmp_path, capsys):
    before = snapshot(world["root"])
    capsys.readouterr()
    assert run_cli("export", "--ckpt_path", str(world["classifier"]), "--out", str(tmp_path / "m.onnx")) == 2
    line = one_line(capsys.readouterr().err)
    assert "no data section" in line and "--config runs/<run>/config.yaml" in line, line
    assert list(tmp_path.iterdir()) == [] and snapshot(world["root"]) == before


def test_export_without_config_takes_the_model_class_from_the_checkpoint(world, tmp_path, capsys):
    """Packed weights need no test images when unchecked: the checkpoint alone says what it is."""
    from deploy.packed import load_packed

    capsys.readouterr()
    assert run_cli("export", "--ckpt_path", str(world["classifier"]), "--out", str(tmp_path / "m.safetensors"),
                   "--format", "int", "--verify", "false") == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "ClassificationModule" in captured.out, captured.err[-3000:]
    assert type(load_packed(tmp_path / "m.safetensors")).__name__ == "ClassificationModule"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


OTHER_TASK = {
    # checkpoint, config -> (the checkpoint's task, the config's)
    "classifier checkpoint, FP32 detector config": ("classifier", "yolo_voc_fp32.yaml",
                                                    "classification model (ClassificationModule)",
                                                    "detection model (DetectionModule)"),
    "classifier checkpoint, LSQ detector config": ("classifier", "yolo_voc_lsq4.yaml",
                                                   "classification model (ClassificationModule)",
                                                   "detection model (DetectionModule)"),
    "detector checkpoint, LSQ classifier config": ("detector", "digits_resnet20_lsq4.yaml",
                                                   "detection model (DetectionModule)",
                                                   "classification model (ClassificationModule)"),
    "detector checkpoint, FP32 classifier config": ("detector", "digits_resnet20_fp32.yaml",
                                                    "detection model (DetectionModule)",
                                                    "classification model (ClassificationModule)"),
}


@pytest.mark.parametrize("case", list(OTHER_TASK))
def test_export_of_the_other_tasks_checkpoint_names_both_tasks(case, world, tmp_path, capsys):
    checkpoint, config, trained, configured = OTHER_TASK[case]
    before = snapshot(world["root"])
    capsys.readouterr()
    assert run_cli("export", "--config", str(REPO / "configs" / config), "--ckpt_path", str(world[checkpoint]),
                   "--out", str(tmp_path / "m.onnx")) == 2
    line = one_line(capsys.readouterr().err)
    assert f"is the checkpoint of a {trained} but the config's model is a {configured}" in line, line
    assert list(tmp_path.iterdir()) == [] and snapshot(world["root"]) == before


@pytest.fixture
def survivable_signals():
    """Handlers that only record SIGTERM / SIGINT while a test sends them to its own process: without the export's
    own handler the test then fails on its assertions instead of ending pytest."""
    received = []
    previous = {s: signal.signal(s, lambda number, _frame: received.append(number))
                for s in (signal.SIGTERM, signal.SIGINT)}
    yield received
    for number, handler in previous.items():
        signal.signal(number, handler)


SIGNALS = {
    # case -> (format, the function the signal arrives in: while the written file is checked, signal, status, name)
    "SIGTERM while the ONNX file is checked": ("onnx", "deploy.verify.compare", signal.SIGTERM, 143, "SIGTERM"),
    "SIGTERM while the packed file is checked": ("int", "deploy.packed.round_trip_identical", signal.SIGTERM, 143,
                                                 "SIGTERM"),
    "Ctrl-C while the packed file is checked": ("int", "deploy.packed.round_trip_identical", signal.SIGINT, 130,
                                                "Ctrl-C"),
    # an extension module being imported (onnxruntime's, the first time the check runs) turns the handler's
    # exception into ImportError("initialization failed"): seen with a real SIGTERM from another process
    "SIGTERM during an extension's import": ("int", "deploy.packed.round_trip_identical", signal.SIGTERM, 143,
                                             "SIGTERM"),
}
WRAPPED = {"SIGTERM during an extension's import"}
# The ONNX export itself takes 5-10 s on 2 cores; the packed cases go through the same atomic write.
SLOW_SIGNALS = {"SIGTERM while the ONNX file is checked"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_SIGNALS else c
                                  for c in SIGNALS])
def test_a_signal_during_export_removes_the_temporary_file(case, world, tmp_path, capsys, monkeypatch,
                                                           survivable_signals):
    """The signal arrives while the temporary file exists (its check runs on it before the rename): the export
    stops with one line and 143 / 130, the temporary file is gone and a previous export at --out is as it was."""
    import importlib

    export_format, where, number, status, name = SIGNALS[case]
    module_name, _, function = where.rpartition(".")
    module = importlib.import_module(module_name)
    original = getattr(module, function)
    seen = []

    def signalled(*args, **kwargs):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))  # it exists now
        if case not in WRAPPED:
            os.kill(os.getpid(), number)
            return original(*args, **kwargs)
        try:
            os.kill(os.getpid(), number)
            return original(*args, **kwargs)
        except BaseException as error:
            raise ImportError("initialization failed") from error

    monkeypatch.setattr(module, function, signalled)
    out = tmp_path / ("m.onnx" if export_format == "onnx" else "m.safetensors")
    out.write_bytes(b"the previous export")
    capsys.readouterr()
    assert run_cli("export", "--config", LSQ4_CONFIG, "--ckpt_path", str(world["classifier"]), "--out", str(out),
                   "--format", export_format, "--verify_images", "16") == status
    line = one_line(capsys.readouterr().err, prefix=f"qreg: export stopped by {name}")
    assert "nothing was written" in line, line
    assert seen, "the signal was not sent while the temporary file existed"
    assert survivable_signals == []  # the export's own handler took it
    assert hidden_files(tmp_path) == [] and out.read_bytes() == b"the previous export"
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the export's handler is gone again


# ---------------------------------------------------------------------------------------------------- precision
PRECISIONS = {
    # case -> (method, precision)
    "fp32 in 64-true": ("fp32", "64-true"),
    "lsq in 64-true": ("lsq", "64-true"),
    "pact_dorefa in 64-true": ("pact_dorefa", "64-true"),
    "dorefa in 64-true": ("dorefa", "64-true"),
    "noise in 64-true": ("noise", "64-true"),
    "fp32 in 64": ("fp32", "64"),
    "fp32 in bf16-true": ("fp32", "bf16-true"),
    "lsq in 16-true": ("lsq", "16-true"),
}


@pytest.mark.parametrize("case", list(PRECISIONS))
def test_an_unsupported_precision_is_refused_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    method, precision = PRECISIONS[case]
    capsys.readouterr()
    assert run_cli("fit", *CLASSIFIER, "--quantization.method", method, "--quantization.weight_bits", "4",
                   "--trainer.precision", precision, "--trainer.default_root_dir", str(tmp_path / "run")) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--trainer.precision {precision} is not supported" in line and "32-true, bf16-mixed or 16-mixed" in line
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []


def test_an_unsupported_precision_is_refused_for_test_too(world, tmp_path, capsys):
    before = snapshot(world["root"])
    capsys.readouterr()
    assert run_cli("test", *CLASSIFIER, "--quantization.method", "lsq", "--quantization.weight_bits", "4",
                   "--ckpt_path", str(world["classifier"]), "--trainer.precision", "64-true",
                   "--trainer.default_root_dir", str(tmp_path / "out")) == 2
    assert "--trainer.precision 64-true is not supported" in one_line(capsys.readouterr().err)
    assert snapshot(world["root"]) == before and not (tmp_path / "out" / "results.jsonl").exists()
