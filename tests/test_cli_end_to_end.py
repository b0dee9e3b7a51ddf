"""`python cli.py fit/test` on the embedded digits data: checkpoints, results rows, reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from lightning_modules import ClassificationModule
from quantizers import LSQQuantizer, QuantConv2d
from records.run_files import read_epoch_metrics
from records.store import read_rows


def clean_accuracies(results: Path) -> list[float]:
    return [r["value"] for r in read_rows(results) if r["corruption"] == "clean" and r["metric"] == "accuracy"]


def test_fit_writes_checkpoint_metrics_and_results_and_test_reproduces_them(digits_fast_args, tmp_path):
    run_dir = tmp_path / "run"
    quant = ["--quantization.method", "lsq", "--quantization.weight_bits", "4"]
    assert run_cli("fit", *digits_fast_args, *quant) == 0
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    assert (run_dir / "config.yaml").exists()

    epochs = read_epoch_metrics(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in epochs] == [0]
    assert {"train/loss", "val/loss", "val/acc", "quant_noise/mean"} <= set(epochs[0])

    rows = read_rows(run_dir / "results.jsonl")
    assert {(r["method"], r["weight_bits"], r["act_bits"], r["model"], r["dataset"]) for r in rows} == {
        ("lsq", 4, 4, "resnet20", "digits")
    }
    assert {r["metric"] for r in rows if r["split"] == "test" and r["corruption"] != "clean"} <= {"accuracy", "loss"}
    clean = {r["metric"]: r["value"] for r in rows if r["corruption"] == "clean"}
    # three training batches leave the model at chance: recorded as collapsed, with what the verdict rests on
    assert set(clean) == {"accuracy", "loss", "images", "chance", "collapsed", "collapsed_layers"}
    assert clean["images"] == 360 and clean["collapsed"] == 1.0

    # Evaluating the checkpoint with an FP32 config: the checkpoint's spec rebuilds the quantized layers.
    assert run_cli("test", *digits_fast_args, "--ckpt_path", str(checkpoint)) == 0
    first, second = clean_accuracies(run_dir / "results.jsonl")
    assert first == second
    assert (run_dir / "config-test.yaml").exists()


def test_load_from_checkpoint_rebuilds_fake_quant_without_the_callback(digits_fast_args, tmp_path):
    quant = ["--quantization.method", "lsq", "--quantization.weight_bits", "2", "--test_after_fit", "false"]
    assert run_cli("fit", *digits_fast_args, *quant) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, weights_only=False)
    assert stored["quantization"]["method"] == "lsq" and stored["quantization"]["weight_bits"] == 2

    module = ClassificationModule.load_from_checkpoint(checkpoint)
    layer = module.net.layer1[0].conv1
    assert isinstance(layer, QuantConv2d) and layer.weight_quantizer.bits == 2
    assert isinstance(layer.input_quantizer, LSQQuantizer) and layer.input_quantizer.ready
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_resume_with_a_different_quantization_is_refused(digits_fast_args, tmp_path, capsys):
    assert run_cli("fit", *digits_fast_args, "--quantization.method", "lsq", "--test_after_fit", "false") == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    status = run_cli("test", *digits_fast_args, "--quantization.method", "pact_dorefa", "--ckpt_path", str(checkpoint))
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized as pact_dorefa W8A8" in err[0]


@pytest.mark.parametrize("config", ["digits_resnet20_fp32.yaml", "digits_resnet20_lsq4.yaml"])
def test_shipped_digits_configs_parse(config, capsys):
    assert run_cli("fit", "--config", str(REPO / "configs" / config), "--print_config") == 0
    printed = capsys.readouterr().out
    assert "DigitsDataModule" in printed and "resnet20" in printed


def test_cli_runs_as_a_script(tmp_path):
    """The real entry point in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [
        sys.executable, "cli.py", "fit", "--config", "configs/digits_resnet20_lsq4.yaml",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
        "--data.init_args.corrupted_test.corruptions", "[motion_blur]",
        "--flatness.images", "64", "--flatness.samples", "2", "--flatness.hessian_samples", "1",  # on, but small
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["method"] == "lsq" for r in rows)
    splits = {(r["corruption"], r["severity"]) for r in rows if r["split"] == "test"}
    assert splits == {("clean", 0)} | {("motion_blur", severity) for severity in range(1, 6)}
    assert {(r["corruption"], r["severity"]) for r in rows if r["split"] == "train"} == {("none", 0)}
    train_metrics = {r["metric"] for r in rows if r["split"] == "train"}
    assert {"sharpness", "hessian_trace"} <= train_metrics  # the flatness measures ran
