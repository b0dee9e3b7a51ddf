"""Quantization noise against the uniform-noise model, and the matched-noise control (the `noise` method)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.models import build_model
from quantizers import (
    DoReFaWeightQuantizer,
    GaussianWeightNoise,
    LSQQuantizer,
    QuantSpec,
    quantize_model,
    weight_noise_statistics,
)
from quantizers.noise import lsq_quantization_error

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_lsq_weight_noise_variance_is_delta_squared_over_12(bits):
    torch.manual_seed(0)
    step = 1.0 / 2 ** (bits - 1)
    low, high = -(2 ** (bits - 1)) * step, (2 ** (bits - 1) - 1) * step
    weight = torch.rand(200_000) * (high - low) + low  # spread over every step of the grid, none clipped
    quantizer = LSQQuantizer(bits, signed=True)
    with torch.no_grad():
        quantizer.step.fill_(step)
    quantizer.mark_ready()
    variance, predicted = weight_noise_statistics(weight, quantizer)
    assert variance / predicted == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_dorefa_weight_noise_variance_is_delta_squared_over_12(bits):
    torch.manual_seed(1)
    weight = torch.randn(200_000) * 0.5
    variance, predicted = weight_noise_statistics(weight, DoReFaWeightQuantizer(bits))
    assert predicted == pytest.approx((2 / (2**bits - 1)) ** 2 / 12)
    assert variance / predicted == pytest.approx(1.0, abs=0.03)


def test_how_noise_falls_with_bits_depends_on_the_grid():
    """A range-fitted grid (DoReFa) gives the textbook 4^-b; LSQ's initial step 2 mean|w| / sqrt(Qp) shrinks
    only as 2^(-b/2), so its noise falls about 2x per bit."""
    torch.manual_seed(2)
    weight = torch.randn(100_000) * 0.05
    bits = (4, 5, 6, 7, 8)
    lsq = [lsq_quantization_error(weight, b)[0].pow(2).mean().item() for b in bits]
    dorefa = [weight_noise_statistics(weight, DoReFaWeightQuantizer(b))[0] for b in bits]
    lsq_ratios = [a / b for a, b in zip(lsq, lsq[1:], strict=False)]
    dorefa_ratios = [a / b for a, b in zip(dorefa, dorefa[1:], strict=False)]
    assert all(3.6 < r < 4.4 for r in dorefa_ratios), dorefa_ratios
    assert all(1.8 < r < 2.4 for r in lsq_ratios), lsq_ratios


def test_matched_noise_has_its_target_variance_and_is_off_at_evaluation():
    torch.manual_seed(3)
    weight = torch.randn(64, 32, 3, 3) * 0.05
    noise = GaussianWeightNoise(4).train()
    target = noise.target_variance(weight).item()
    error, _ = lsq_quantization_error(weight, 4)
    assert target == pytest.approx(error.pow(2).mean().item())
    samples = torch.stack([noise(weight) - weight for _ in range(50)])
    assert samples.var().item() == pytest.approx(target, rel=0.03)
    assert abs(samples.mean().item()) < 3 * math.sqrt(target / samples.numel())
    assert not torch.equal(noise(weight), noise(weight))  # resampled every step
    noise.eval()
    assert torch.equal(noise(weight), weight)


def test_matched_noise_gradient_is_the_identity():
    weight = (torch.randn(16, 8) * 0.1).requires_grad_()
    upstream = torch.randn(16, 8)
    GaussianWeightNoise(2).train()(weight).backward(upstream)
    assert torch.equal(weight.grad, upstream)


def test_noise_method_swaps_every_layer_weights_only_and_per_layer_variance_matches():
    model = quantize_model(build_model("resnet20", 10), QuantSpec(method="noise", weight_bits=4))
    layers = [m for m in model.modules() if hasattr(m, "weight_quantizer")]
    assert all(isinstance(m.weight_quantizer, GaussianWeightNoise) and m.input_quantizer is None for m in layers)
    assert model.layer1[0].conv1.weight_quantizer.bits == 4 and model.conv1.weight_quantizer.bits == 8
    for layer in (model.layer2[1].conv2, model.fc):
        layer.weight_quantizer.train()
        sampled = torch.stack([layer.weight_quantizer(layer.weight) - layer.weight for _ in range(30)])
        target = layer.weight_quantizer.target_variance(layer.weight).item()
        assert sampled.var().item() == pytest.approx(target, rel=0.05)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))  # no noise at evaluation
    assert QuantSpec(method="noise", weight_bits=4).describe() == "noise W4"
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "LSQQuantizer" for m in model.modules())


def test_one_noise_statistic_for_every_method():
    """LSQ, DoReFa and the matched-noise control all report the mean square of their noise, so the figure that
    compares them compares like with like; for the control it equals the variance of the noise it injects."""
    torch.manual_seed(3)
    weight = 1.0 + 0.01 * torch.randn(50_000)  # all near one grid point: the noise has a large mean
    lsq = LSQQuantizer(3, signed=True)
    lsq.initialize_from(weight)
    delta = lsq(weight) - weight
    assert weight_noise_statistics(weight, lsq)[0] == pytest.approx(delta.pow(2).mean().item(), rel=1e-5)
    assert delta.var(unbiased=False).item() < 0.5 * delta.pow(2).mean().item()  # the variance is another number
    control = GaussianWeightNoise(3).train()
    injected = control(weight) - weight
    assert weight_noise_statistics(weight, control)[0] == pytest.approx(float(control.last_variance), rel=1e-6)
    assert injected.pow(2).mean().item() == pytest.approx(float(control.last_variance), rel=0.03)
