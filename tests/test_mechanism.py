"""Theorem 3.1 estimators on a case with a known answer, flatness measures, and the theorem command."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.models import build_model
from quantizers import QuantSpec, quantize_model, quantizers_in
from records.mechanism import (
    fake_quantization_off,
    gradient_norm_term,
    hessian_trace,
    noise_loss_increase,
    sharpness,
)


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output.squeeze(1), target)


def linear_regression(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Linear(20, 1, bias=False)
    x = torch.randn(256, 20) * torch.linspace(0.2, 2.0, 20)
    y = x @ torch.randn(20) + 0.1 * torch.randn(256)
    with torch.no_grad():  # the trained weights: the least-squares fit (the theorem expands around a minimum)
        net.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T)
    return net, [(x[:128], y[:128]), (x[128:], y[128:])], x


def test_monte_carlo_matches_the_gradient_norm_term_for_a_linear_model_with_squared_error():
    """For y_hat = w.x and L = mean (y_hat - y)^2, E[L(w + delta)] - L(w) = sigma^2 mean ||x||^2 exactly, which is
    Eq. 4's sigma^2 mean ||grad_w y_hat||^2 and also 0.5 sigma^2 tr(H)."""
    net, batches, x = linear_regression()
    sigma2 = 0.01
    variances = {"weight": sigma2}
    exact = sigma2 * x.pow(2).sum(1).mean().item()
    measured, error = noise_loss_increase(net, batches, variances, samples=4000, loss=squared_error)
    assert abs(measured - exact) < 4 * error
    assert error < 0.05 * exact  # the check has teeth: the Monte-Carlo error is small against the effect
    assert gradient_norm_term(net, batches, variances) == pytest.approx(exact, rel=1e-4)
    trace, trace_error = hessian_trace(net, batches, samples=200, weights=variances, loss=squared_error)
    assert 0.5 * trace == pytest.approx(exact, rel=0.1)


def test_hutchinson_trace_of_a_known_quadratic():
    torch.manual_seed(1)
    net = nn.Linear(10, 1, bias=False)
    x = torch.randn(64, 10)
    y = torch.randn(64)
    trace, error = hessian_trace(net, [(x, y)], samples=400, loss=squared_error)
    exact = (2 * x.pow(2).sum() / 64).item()  # H = 2/m X^T X
    assert abs(trace - exact) < 4 * error + 1e-6


def test_sharpness_grows_with_rho_and_is_zero_at_zero():
    torch.manual_seed(2)
    net = build_model("resnet20", 10).eval()
    batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))]
    zero, _ = sharpness(net, batches, rho=0.0, samples=2)
    small, _ = sharpness(net, batches, rho=0.02, samples=4)
    large, _ = sharpness(net, batches, rho=0.5, samples=4)
    assert zero == pytest.approx(0.0, abs=1e-6)
    assert abs(small) < abs(large) and large > 0


def test_fake_quantization_off_restores_the_quantizers():
    net = quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", weight_bits=2)).eval()
    for _, quantizer in quantizers_in(net):  # count the activation steps as initialised, as a training batch would
        quantizer.mark_ready()
    x = torch.rand(4, 3, 32, 32)
    quantized = net(x)
    with fake_quantization_off(net):
        full_precision = net(x)
        assert all(getattr(m, "weight_quantizer", None) is None for m in net.modules() if hasattr(m, "input_quantizer"))
    assert torch.equal(net(x), quantized)
    assert not torch.equal(full_precision, quantized)


def test_theorem_command_on_a_trained_fp32_run(digits_fast_args, tmp_path, capsys):
    from conftest import run_cli
    from records.store import read_rows

    assert run_cli("fit", *digits_fast_args, "--flatness.enabled", "false") == 0
    status = run_cli("theorem", str(tmp_path / "run"), "--bits", "[2, 8]", "--images", "16", "--samples", "2",
                     "--hessian_samples", "1")
    assert status == 0
    rows = [r for r in read_rows(tmp_path / "run" / "results.jsonl") if r["metric"].startswith("theorem_")]
    by_bits = {(r["weight_bits"], r["metric"]): r["value"] for r in rows}
    assert by_bits[(2, "theorem_noise_variance")] > 10 * by_bits[(8, "theorem_noise_variance")]
    assert all(math.isfinite(by_bits[(b, "theorem_gradient_norm_term")]) for b in (2, 8))
    assert "Theorem 3.1" in capsys.readouterr().out
    assert run_cli("theorem", str(tmp_path / "nothing")) == 2
    # a run config that is not UTF-8 (edited by hand in another encoding): one line, nothing appended
    store = (tmp_path / "run" / "results.jsonl").read_bytes()
    config = tmp_path / "run" / "config.yaml"
    config.write_bytes(config.read_bytes().replace(b"# lightning", b"# \xe9 lightning", 1))
    assert run_cli("theorem", str(tmp_path / "run"), "--bits", "[8]") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "config.yaml is not a readable run config (UnicodeDecodeError" in err
    assert (tmp_path / "run" / "results.jsonl").read_bytes() == store
