"""The integer grid behind each fake quantizer: the one place that says how qreg's levels become integers.

Every quantizer qreg trains produces levels `integer * scale` (zero point 0) on a grid of evenly spaced
integers, which is what ONNX's QuantizeLinear / DequantizeLinear compute and what the packed format stores:

| quantizer | scale | integers | storage |
|---|---|---|---|
| LSQ weights | the learned step (per tensor or per channel) | [-2^(b-1), 2^(b-1)-1] | int8 |
| LSQ activations | the learned step | [0, 2^b-1], or [-2^(b-1), 2^(b-1)-1] with act_signed | uint8 / int8 |
| PACT activations | alpha / (2^b-1) | [0, 2^b-1] | uint8 |
| DoReFa weights | 1/(2^b-1), times max|w| with rescale (last layer) | odd in [-(2^b-1), 2^b-1] | int8 (int16: 8 bits) |

DoReFa's levels `2 q/(2^b-1) - 1` (q = 0..2^b-1) are `(2q - (2^b-1)) / (2^b-1)`: odd integers over 2^b-1,
which has no zero level and needs no zero point. At 8 bits the odd integers reach +-255, outside int8, so
they are stored as int16 (ONNX opset 21). The integers of a trained layer are read off its quantizer's own
output (`round(Q(w) / scale)`), so the grids here can never drift from what training computed; a weight
that does not land on its grid is a bug and stops the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deploy.errors import ExportError
from quantizers import DoReFaWeightQuantizer, GaussianWeightNoise, LSQQuantizer, PACTQuantizer
from quantizers.lsq import _MIN_STEP  # the forward pass's floor on the step: the scale it really uses

_STORAGE = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-32768, 32767),
}


@dataclass(frozen=True)
class IntegerGrid:
    """Levels `k * scale` for integers k = low, low + stride, ..., high (zero point 0).

    `scale` is a 0-d tensor, or 1-d with one value per slice along `axis` (output channels of a weight).
    """

    bits: int
    scale: torch.Tensor
    low: int
    high: int
    stride: int = 1
    axis: int | None = None

    @property
    def storage(self) -> torch.dtype:
        """The smallest ONNX-supported integer type that holds the grid."""
        for dtype, (lo, hi) in _STORAGE.items():
            if lo <= self.low and self.high <= hi:
                return dtype
        raise ExportError(f"no integer type holds the grid [{self.low}, {self.high}]")

    @property
    def storage_is_full(self) -> bool:
        """True when the storage type's own range is the grid, so QuantizeLinear's saturation is the clip."""
        return _STORAGE[self.storage] == (self.low, self.high)

    def broadcast_scale(self, ndim: int) -> torch.Tensor:
        if self.scale.dim() == 0:
            return self.scale
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.view(shape)

    def codes(self, integers: torch.Tensor) -> torch.Tensor:
        """The integers as unsigned b-bit codes 0 .. 2^b-1 (what the packed format stores)."""
        return ((integers - self.low) // self.stride).to(torch.uint8)

    def integers(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int32) * self.stride + self.low


def lsq_scale(quantizer: LSQQuantizer) -> torch.Tensor:
    return quantizer.step.detach().float().clamp_min(_MIN_STEP).clone()


def _lsq_grid(quantizer: LSQQuantizer, axis: int | None) -> IntegerGrid:
    return IntegerGrid(quantizer.bits, lsq_scale(quantizer), -quantizer.q_neg, quantizer.q_pos, axis=axis)


def weight_grid(layer: nn.Module, name: str = "") -> IntegerGrid | None:
    """The grid of a quantized layer's weights, or None where the deployed weights stay float."""
    quantizer = layer.weight_quantizer
    if quantizer is None or isinstance(quantizer, GaussianWeightNoise):  # matched noise: float at inference
        return None
    if isinstance(quantizer, LSQQuantizer):
        return _lsq_grid(quantizer, axis=0 if quantizer.step.dim() else None)
    if isinstance(quantizer, DoReFaWeightQuantizer):
        levels = 2**quantizer.bits - 1
        if not quantizer.rescale:  # levels in [-1, 1] whatever the weights' scale
            return IntegerGrid(quantizer.bits, torch.tensor(1.0 / levels), -levels, levels, stride=2)
        max_abs = quantizer._max(layer.weight.detach().float())
        per_channel = quantizer.per_channel
        return IntegerGrid(quantizer.bits, (max_abs.reshape(-1) if per_channel else max_abs) / levels,
                           -levels, levels, stride=2, axis=0 if per_channel else None)
    raise ExportError(f"{name or 'a layer'}: no integer grid is known for weight quantizer "
                      f"{type(quantizer).__name__}")


def activation_grid(layer: nn.Module, name: str = "") -> IntegerGrid | None:
    """The grid of a quantized layer's input, or None where its input stays float."""
    quantizer = layer.input_quantizer
    if quantizer is None:
        return None
    if isinstance(quantizer, LSQQuantizer):
        if not quantizer._initialized:
            raise ExportError(
                f"{name or 'a layer'}: its LSQ activation step was never initialised (the model saw no training "
                "batch); export a trained checkpoint"
            )
        return _lsq_grid(quantizer, axis=None)
    if isinstance(quantizer, PACTQuantizer):
        # The very division PACT's forward makes (float32 alpha / int levels), so the scale is bit-identical.
        return IntegerGrid(quantizer.bits, (quantizer.alpha.detach() / quantizer.levels).clone(), 0, quantizer.levels)
    raise ExportError(f"{name or 'a layer'}: no integer grid is known for input quantizer "
                      f"{type(quantizer).__name__}")


@torch.no_grad()
def weight_integers(layer: nn.Module, grid: IntegerGrid, name: str = "") -> torch.Tensor:
    """The integer of every weight: its quantizer's output divided by the grid's scale (int32)."""
    quantized = layer.weight_quantizer(layer.weight.detach()).float()
    ratio = quantized / grid.broadcast_scale(quantized.dim())
    integers = ratio.round()
    off_grid = (ratio - integers).abs().max().item() if integers.numel() else 0.0
    integers = integers.to(torch.int32)
    outside = (integers < grid.low) | (integers > grid.high) | ((integers - grid.low) % grid.stride != 0)
    if off_grid > 1e-3 or bool(outside.any()):
        raise RuntimeError(f"{name or 'a layer'}: its quantized weights are not on the expected integer grid "
                           f"(largest distance {off_grid:.3g}); this is a bug in qreg's exporter")
    return integers
