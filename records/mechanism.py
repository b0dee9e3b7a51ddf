"""Measuring the paper's mechanism: quantization as weight noise, Theorem 3.1, flatness.

Theorem 3.1 (Eq. 4) says that for a squared-error loss, weight noise delta ~ N(0, sigma^2 I) adds, to first
order, the gradient-norm penalty sigma^2 * mean_i ||grad_w y_hat_i||^2. This module measures both sides on
a trained network: the Monte-Carlo estimate of E[L(w + delta)] - L(w) with each layer's delta of the
variance of b-bit quantization noise, the gradient-norm term, and, because the networks here are trained
with cross-entropy (where the first-order term has no sign), the second-order term
0.5 * sum_l sigma_l^2 tr(H_l) by Hutchinson's estimator. Flatness is the mean loss increase under random
weight perturbations of relative size rho, and the Hessian trace.

All of it is measured on the full-precision function of the weights (fake quantization switched off): the
quantized loss is piecewise constant in w, and L(w) is the landscape Theorem 3.1 says the noise regularizes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantizers import quantized_layers
from quantizers.noise import lsq_quantization_error

Batch = tuple[torch.Tensor, torch.Tensor]
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def fake_quantization_off(net: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run every quantized layer in full precision (weights and inputs)."""
    saved = {}
    for name, layer in quantized_layers(net).items():
        saved[name] = (layer.weight_quantizer, layer.input_quantizer)
        layer.weight_quantizer, layer.input_quantizer = None, None
    try:
        yield net
    finally:
        layers = quantized_layers(net)
        for name, (weight_quantizer, input_quantizer) in saved.items():
            layers[name].weight_quantizer, layers[name].input_quantizer = weight_quantizer, input_quantizer


def weight_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every Conv2d and Linear, by parameter name: what quantization perturbs."""
    return {f"{name}.weight" if name else "weight": m.weight
            for name, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


@torch.no_grad()
def quantization_noise_variances(net: nn.Module, bits: int) -> dict[str, float]:
    """Per layer, the variance of b-bit quantization noise of its current weights (LSQ grid at its init step)."""
    return {name: lsq_quantization_error(w.detach(), bits)[0].pow(2).mean().item()
            for name, w in weight_parameters(net).items()}


@torch.no_grad()
def mean_loss(net: nn.Module, batches: Sequence[Batch], loss: LossFunction = F.cross_entropy) -> float:
    total, count = 0.0, 0
    for inputs, targets in batches:
        total += loss(net(inputs), targets).item() * len(inputs)
        count += len(inputs)
    return total / count


@torch.no_grad()
def loss_and_accuracy(net: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) over the batches."""
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in batches:
        logits = net(inputs)
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(inputs)
    return total_loss / count, 100.0 * correct / count


@torch.no_grad()
def perturbed_loss_increase(
    net: nn.Module, batches: Sequence[Batch], scale: Callable[[str, torch.Tensor], torch.Tensor | float],
    samples: int, seed: int = 0, loss: LossFunction = F.cross_entropy,
) -> tuple[float, float]:
    """Monte-Carlo mean and standard error of L(w + delta) - L(w), delta = scale(name, w) * N(0, I) per layer."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weights = weight_parameters(net)
    base = mean_loss(net, batches, loss)
    increases = []
    for _ in range(samples):
        noises = {}
        for name, w in weights.items():
            noises[name] = (torch.randn(w.shape, generator=generator) * scale(name, w)).to(w.device, w.dtype)
            w.add_(noises[name])
        try:
            increases.append(mean_loss(net, batches, loss) - base)
        finally:
            for name, w in weights.items():
                w.sub_(noises[name])
    mean = sum(increases) / samples
    spread = math.sqrt(sum((x - mean) ** 2 for x in increases) / (samples - 1)) if samples > 1 else math.nan
    return mean, spread / math.sqrt(samples)


def noise_loss_increase(net, batches, variances: dict[str, float], samples: int, seed: int = 0,
                        loss: LossFunction = F.cross_entropy) -> tuple[float, float]:
    """E[L(w + delta)] - L(w) with delta_l ~ N(0, sigma_l^2 I): the left side of Theorem 3.1."""
    return perturbed_loss_increase(net, batches, lambda name, _w: math.sqrt(variances[name]), samples, seed, loss)


def sharpness(net, batches, rho: float = 0.05, samples: int = 10, seed: int = 0) -> tuple[float, float]:
    """Mean loss increase under random perturbations of relative size rho: each layer gets Gaussian noise
    scaled so its norm is rho * ||w_l|| (filter-free, layer-normalised, so layers of any scale compare)."""

    def scale(_name: str, w: torch.Tensor) -> torch.Tensor:
        return rho * w.norm() / math.sqrt(w.numel())

    return perturbed_loss_increase(net, batches, scale, samples, seed)


def gradient_norm_term(net: nn.Module, batches: Sequence[Batch], variances: dict[str, float]) -> float:
    """Eq. 4's regularizer, sum_l sigma_l^2 * mean_i ||J_l(x_i)||_F^2, J_l = d y_hat_i / d w_l.

    Per-sample Jacobians (all outputs) with torch.func; exact, one vmap per output coordinate.
    """
    from torch.func import functional_call, grad, vmap

    weights = weight_parameters(net)
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    chosen = list(weights)

    def output(chosen_values, x, k):
        merged = {**params, **dict(zip(chosen, chosen_values, strict=True))}
        return functional_call(net, (merged, buffers), (x.unsqueeze(0),))[0, k]

    total, count = 0.0, 0
    for inputs, _ in batches:
        with torch.no_grad():
            outputs = net(inputs[:1]).shape[1]
        per_sample = torch.zeros(len(inputs))
        for k in range(outputs):
            grads = vmap(grad(output), in_dims=(None, 0, None))(tuple(params[c] for c in chosen), inputs, k)
            for name, g in zip(chosen, grads, strict=True):
                per_sample += variances[name] * g.flatten(1).pow(2).sum(1).cpu()
        total += per_sample.sum().item()
        count += len(inputs)
    return total / count


def hessian_trace(net: nn.Module, batches: Sequence[Batch], samples: int = 10, seed: int = 0,
                  weights: dict[str, float] | None = None, loss: LossFunction = F.cross_entropy) -> tuple[float, float]:
    """Hutchinson's estimate of sum_l c_l tr(H_l) (c_l = 1, or the given per-layer weights), H the loss
    Hessian over the layers' weights; mean and standard error over Rademacher samples.

    One Hessian-vector product per sample with a full Rademacher vector v: E[v_l . (Hv)_l] = tr(H_ll).
    """
    parameters = weight_parameters(net)
    names = list(parameters)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    estimates = []
    for _ in range(samples):
        vector = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype)
                  for p in parameters.values()]
        value = 0.0
        count = 0
        for inputs, targets in batches:
            batch_loss = loss(net(inputs), targets)
            grads = torch.autograd.grad(batch_loss, list(parameters.values()), create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
            products = torch.autograd.grad(dot, list(parameters.values()))
            value += len(inputs) * sum((1.0 if weights is None else weights[n]) * (hv * v).sum().item()
                                       for n, hv, v in zip(names, products, vector, strict=True))
            count += len(inputs)
        estimates.append(value / count)
    mean = sum(estimates) / samples
    spread = math.sqrt(sum((x - mean) ** 2 for x in estimates) / (samples - 1)) if samples > 1 else math.nan
    return mean, spread / math.sqrt(samples)
