"""A user's mistake ends in one clear line on stderr, exit status 2, and nothing written or overwritten.

Table-driven: each case names the command line (built from a few prepared files: a finished quantized run, a
results store, an image folder), the text its one line must contain, and the files that must stay untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from datamodules.cifar import CIFAR10_CLASSES

BASE = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--trainer.max_epochs", "1",
        "--flatness.enabled", "false", "--data.init_args.corrupted_test.corruptions", "[]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Files the bad inputs point at: a finished LSQ run, a study store, configs, a broken image folder."""
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    args = ["fit", *BASE, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--quantization.method", "lsq",
            "--quantization.weight_bits", "4", "--trainer.default_root_dir", str(run)]
    assert run_cli(*args) == 0
    (root / "bad_key.yaml").write_text("trainer:\n  max_epochz: 3\n")
    (root / "broken.yaml").write_text("trainer: [max_epochs: 3\n")
    corrupt_store = root / "corrupt_study"
    corrupt_store.mkdir()
    good = (run / "results.jsonl").read_text().splitlines()[0]
    (corrupt_store / "results.jsonl").write_text(good + "\n" + good[: len(good) // 2] + "\n")
    (root / "empty_study").mkdir()
    images = root / "cifar"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (images / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / split / name / "0.png")
    (images / "train" / "cat" / "1.png").write_bytes(b"\x89PNG truncated")
    release = root / "release"
    release.mkdir()
    np.save(release / "labels.npy", np.zeros(5 * 360, dtype=np.uint8))  # digits' 360 test labels are not all 0
    (root / "study_bad.yaml").write_text(
        f"name: bad\nbase: [{run / 'config.yaml'}]\nmethods: [{{method: fp32}}, {{method: lsqq, bits: [4]}}]\n")
    (root / "study_empty.yaml").write_text(f"name: empty\nbase: [{run / 'config.yaml'}]\nmethods: []\n")
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "store": corrupt_store,
            "images": images, "release": release}


def fit(*extra: str):
    return lambda w, out: ["fit", *BASE, "--trainer.default_root_dir", str(out), *extra]


CASES = {
    # quantization config
    "unknown method": (fit("--quantization.method", "lsqq"), "unknown quantization method 'lsqq'"),
    "bits 0": (fit("--quantization.method", "lsq", "--quantization.weight_bits", "0"), "from 2 to 8, got 0"),
    "bits 1": (fit("--quantization.method", "lsq", "--quantization.weight_bits", "1"), "from 2 to 8, got 1"),
    "bits 9": (fit("--quantization.method", "lsq", "--quantization.weight_bits", "9"), "from 2 to 8, got 9"),
    "bits 33": (fit("--quantization.method", "lsq", "--quantization.weight_bits", "33"), "from 2 to 8, got 33"),
    "activation bits 1": (fit("--quantization.method", "lsq", "--quantization.act_bits", "1"), "act_bits"),
    "signed PACT": (fit("--quantization.method", "pact_dorefa", "--quantization.act_signed", "true"),
                    "clips activations at 0"),
    "pattern matches no layer": (fit("--quantization.method", "lsq", "--quantization.exclude", "[nothing.*]"),
                                 "matches no Conv2d/Linear"),
    # config files and keys
    "unknown trainer key": (fit("--trainer.max_epochz", "3"), "max_epochz"),
    "unknown quantization key": (fit("--quantization.bits", "4"), "quantization.bits"),
    "unknown key in a config file": (lambda w, out: ["fit", "--config", str(w["root"] / "bad_key.yaml")],
                                     "max_epochz"),
    "malformed config file": (lambda w, out: ["fit", "--config", str(w["root"] / "broken.yaml")],
                              "broken.yaml is not valid YAML"),
    "missing config file": (lambda w, out: ["fit", "--config", str(w["root"] / "absent.yaml")], "absent.yaml"),
    "unknown model": (fit("--model.init_args.model", "resnet21"), "unknown model 'resnet21'"),
    "batch size 0": (fit("--data.init_args.batch_size", "0"), "batch sizes must be >= 1"),
    "validation split too large": (fit("--data.init_args.val_size", "5000"), "leaves no training images"),
    # data
    "missing dataset root": (fit("--data", "CIFAR10DataModule", "--data.init_args.root", "/nonexistent/cifar"),
                             "cifar10 not found under '/nonexistent/cifar'"),
    "undecodable image": (lambda w, out: fit("--data", "CIFAR10DataModule", "--data.init_args.root", str(w["images"]),
                                             "--data.init_args.val_size", "2")(w, out), "cannot decode image"),
    "unknown corruption": (fit("--data.init_args.corrupted_test.corruptions", "[fgo]"), "unknown corruption"),
    "severity 0": (fit("--data.init_args.corrupted_test.severities", "[0]"), "1..5"),
    "severity 6": (fit("--data.init_args.corrupted_test.severities", "[6]"), "1..5"),
    "unknown corruption profile": (fit("--data.init_args.corrupted_test.profile", "tiny"), "not a valid choice"),
    "CIFAR-C release with foreign labels": (
        lambda w, out: ["test", *BASE[:-2], "--data.init_args.corrupted_test.release_root", str(w["release"]),
                        "--data.init_args.corrupted_test.corruptions", "[fog]", "--ckpt_path", str(w["ckpt"]),
                        "--trainer.default_root_dir", str(out)],
        "does not match the clean test labels"),
    # checkpoints
    "checkpoint quantized differently from the config": (
        lambda w, out: ["test", *BASE, "--quantization.method", "lsq", "--quantization.weight_bits", "8",
                        "--ckpt_path", str(w["ckpt"]), "--trainer.default_root_dir", str(out)],
        "already quantized as lsq W8A8"),
    "missing checkpoint": (lambda w, out: ["test", *BASE, "--ckpt_path", str(w["root"] / "none.ckpt"),
                                           "--trainer.default_root_dir", str(out)], "none.ckpt"),
    # study, report and tools
    "results store with a corrupt line": (lambda w, out: ["report", str(w["store"])], "results.jsonl:2"),
    "study folder without results": (lambda w, out: ["report", str(w["root"] / "empty_study")], "no results file"),
    "study with an unknown method": (lambda w, out: ["study", "--config", str(w["root"] / "study_bad.yaml"),
                                                     "--output_dir", str(out)], "unknown method 'lsqq'"),
    "study with an empty grid": (lambda w, out: ["study", "--config", str(w["root"] / "study_empty.yaml"),
                                                 "--output_dir", str(out)], "empty grid"),
    "corrupt command with an unknown corruption": (
        lambda w, out: ["corrupt", "--data", "DigitsDataModule", "--data.init_args.corrupted_test.corruptions",
                        "[nope]", "--cache_dir", str(out)], "unknown corruption"),
    "theorem on a folder that is no run": (lambda w, out: ["theorem", str(w["root"] / "empty_study")], "no FP32 run"),
}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, world, tmp_path, capsys):
    command, message = CASES[name]
    out = tmp_path / "out"
    before = snapshot(world["root"])
    capsys.readouterr()
    status = run_cli(*command(world, out))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2, err
    errors = [line for line in err if "qreg: error" in line or "Traceback" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert message in err[-1], err[-1]
    assert snapshot(world["root"]) == before  # nothing existing was overwritten
    assert not (out / "checkpoints").exists() and not (out / "results.jsonl").exists()
    if out.exists():
        assert not list(out.rglob("*.npy"))  # no partial corruption cache
