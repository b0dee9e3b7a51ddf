"""Quantization noise, measured, and the matched-noise control that imitates it.

The paper models weight quantization as additive noise `Q(w) = w + delta` whose size shrinks with precision.
Each method's noise is measured by `quantizers.methods.weight_noise_statistics`; this module provides the
control experiment the paper lacks: `GaussianWeightNoise`, full-precision training with additive Gaussian
weight noise whose per-layer variance matches b-bit quantization noise, resampled every step and absent at
evaluation. If a b-bit quantized model generalizes like its matched-noise twin, the regularization is the
noise; if not, something else about quantization (clipping, the grid, activation quantization) matters.
"""

from __future__ import annotations

import math

import torch

from quantizers.base import Quantizer
from quantizers.errors import QuantSpecError
from quantizers.grid import IntegerGrid
from quantizers.lsq import lsq_grid
from quantizers.straight_through import in_float32


def lsq_init_step(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The LSQ step a b-bit signed weight grid starts from: 2 * mean|w| / sqrt(Qp)."""
    return 2 * weight.abs().mean() / math.sqrt(lsq_grid(bits, signed=True)[1])


@torch.no_grad()
def lsq_quantization_error(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q(w) - w, step) for a b-bit signed LSQ grid at its initial step."""
    q_neg, q_pos = lsq_grid(bits, signed=True)
    step = lsq_init_step(weight, bits)
    return (weight / step).clamp(-q_neg, q_pos).round() * step - weight, step


class GaussianWeightNoise(Quantizer):
    """Adds N(0, sigma^2) to the weights in training, sigma^2 = the variance of b-bit quantization noise.

    The variance is recomputed from the current weights at every step (the b-bit LSQ grid at its initial
    step, `2 mean|w| / sqrt(Qp)`), so the noise tracks the weights as they change, like quantization noise
    does. The gradient passes to the weights unchanged (the noise is a constant of the step), as it does
    through a straight-through quantizer. In eval mode the weights are used as they are.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 2:
            raise QuantSpecError(f"matched noise needs an integer bit width >= 2, got {bits!r}")
        self.bits = bits
        self.last_variance: torch.Tensor | None = None  # mean square of the last noise drawn (on the device)

    def extra_repr(self) -> str:
        return f"matched to {self.bits}-bit quantization noise"

    def integer_grid(self, weight: torch.Tensor | None = None) -> IntegerGrid | None:
        return None  # a regulariser of training only: the deployed weights are the float weights

    @torch.no_grad()
    def target_variance(self, weight: torch.Tensor) -> torch.Tensor:
        error, _ = lsq_quantization_error(weight, self.bits)
        return error.pow(2).mean()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight
        weight_32 = in_float32(weight)  # the variance and the draw in float32, as the quantizers compute
        variance = self.target_variance(weight_32)
        self.last_variance = variance  # a tensor: no host sync in the training step
        return (weight_32 + torch.randn_like(weight_32) * variance.sqrt()).to(weight.dtype)
