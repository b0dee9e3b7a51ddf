"""Slow checks (`pytest -m slow`): the shipped digits configs, real CIFAR-10, torch.compile parity."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from records.store import read_rows

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: int = 3600) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "cli.py", *args, "--trainer.enable_progress_bar", "false"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def clean_accuracy(results_file) -> list[float]:
    rows = read_rows(results_file)
    return [r["value"] for r in rows if r["corruption"] == "clean" and r["metric"] == "accuracy"]


@pytest.mark.parametrize("config", ["digits_resnet20_fp32", "digits_resnet20_lsq4"])
def test_shipped_digits_config_reaches_90_percent_and_test_reproduces_it(config, tmp_path):
    run = tmp_path / config
    clean_only = ("--data.init_args.corrupted_test.corruptions", "[]")
    cli("fit", "--config", f"configs/{config}.yaml", "--trainer.default_root_dir", str(run), *clean_only)
    cli("test", "--config", f"configs/{config}.yaml", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        *clean_only)
    at_fit_end, from_checkpoint = clean_accuracy(run / "results.jsonl")
    print(f"{config}: test accuracy {at_fit_end:.3f} % at the end of fit, {from_checkpoint:.3f} % from last.ckpt")
    assert at_fit_end >= 90.0
    assert from_checkpoint == at_fit_end


@pytest.mark.parametrize("quantization", [["--quantization.method", "fp32"],
                                          ["--quantization.method", "lsq", "--quantization.weight_bits", "8"]])
def test_resnet20_on_real_cifar10_exceeds_50_percent_in_two_epochs(quantization, cifar10_root, tmp_path):
    run = tmp_path / "run"
    cli("fit", "--data", "CIFAR10DataModule", "--data.init_args.root", str(cifar10_root),
        "--model", "ClassificationModule", "--model.init_args.model", "resnet20", "--trainer.max_epochs", "2",
        "--data.init_args.corrupted_test.corruptions", "[]",
        "--trainer.default_root_dir", str(run), *quantization)
    (accuracy,) = clean_accuracy(run / "results.jsonl")
    print(f"{quantization}: CIFAR-10 test accuracy after 2 epochs {accuracy:.2f} %")
    assert accuracy > 50.0


@pytest.mark.parametrize("activation", [True, False])
def test_compiled_lsq_matches_eager(activation):
    from quantizers import LSQQuantizer

    torch.manual_seed(0)
    quantizer = LSQQuantizer(4, signed=not activation, activation=activation).train()
    x = torch.randn(16, 8, 6, 6)
    x = x.relu() if activation else x
    quantizer(x)  # initialise eagerly
    upstream = torch.randn_like(x)
    eager_x = x.clone().requires_grad_()
    eager = quantizer(eager_x)
    eager.backward(upstream)
    eager_step_grad = quantizer.step.grad.clone()
    quantizer.step.grad = None
    compiled_x = x.clone().requires_grad_()
    compiled = torch.compile(quantizer)(compiled_x)
    compiled.backward(upstream)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-6, atol=0)  # traced ops: (g * s) / s
    # a float32 sum over 4,608 elements in another order (and with cancellation): agree to 1e-4
    torch.testing.assert_close(quantizer.step.grad, eager_step_grad, rtol=1e-4, atol=1e-7)
