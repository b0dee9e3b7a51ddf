"""A user's mistake ends in one clear line on stderr, exit status 2, and nothing written."""

from __future__ import annotations

import pytest

from conftest import run_cli

BASE = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--trainer.max_epochs", "1"]

CASES = {
    "unknown method": (["--quantization.method", "lsqq"], "'lsqq' is not a valid choice"),
    "bits 0": (["--quantization.method", "lsq", "--quantization.weight_bits", "0"], "from 2 to 8, got 0"),
    "bits 1": (["--quantization.method", "lsq", "--quantization.weight_bits", "1"], "from 2 to 8, got 1"),
    "bits 9": (["--quantization.method", "lsq", "--quantization.weight_bits", "9"], "from 2 to 8, got 9"),
    "bits 33": (["--quantization.method", "lsq", "--quantization.weight_bits", "33"], "from 2 to 8, got 33"),
    "act bits 1": (["--quantization.method", "lsq", "--quantization.act_bits", "1"], "act_bits"),
    "missing dataset root": (
        ["--data", "CIFAR10DataModule", "--data.init_args.root", "/nonexistent/cifar"],
        "cifar10 not found under '/nonexistent/cifar'",
    ),
    "unknown config key": (["--trainer.max_epochz", "3"], "max_epochz"),
    "unknown quantization key": (["--quantization.bits", "4"], "quantization.bits"),
    "unknown model": (["--model.init_args.model", "resnet21"], "unknown model 'resnet21'"),
    "val split too large": (["--data.init_args.val_size", "5000"], "leaves no training images"),
    "pattern matches nothing": (
        ["--quantization.method", "lsq", "--quantization.exclude", "[nothing.*]"], "matches no Conv2d/Linear"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_status_2(name, tmp_path, capsys):
    extra, message = CASES[name]
    run_dir = tmp_path / "run"
    status = run_cli("fit", *BASE, "--trainer.default_root_dir", str(run_dir), *extra)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, err
    assert err[-1].startswith("qreg: error:") and message in err[-1]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.jsonl").exists()


def test_unknown_key_in_a_config_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("trainer:\n  max_epochz: 3\n")
    assert run_cli("fit", "--config", str(config)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_epochz" in err[0]
