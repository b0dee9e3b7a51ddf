"""`IntegerGrid`: the evenly spaced integers a quantizer's levels are, and the scale that makes them levels.

Every exportable quantizer says which grid its forward pass computes on (`Quantizer.integer_grid`), so the
exporters (ONNX QDQ, packed integers) never need to know a quantizer's class or its private state. It lives
here, below the exporters, because the quantizer that owns the forward pass is the one place that can state
its grid exactly (the very scale tensor the forward pass divides by).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The integer types a grid can be stored in (all of them QuantizeLinear / DequantizeLinear types), smallest first.
_STORAGE = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-32768, 32767),
}


class NoIntegerGrid(ValueError):
    """A quantizer that cannot state its integer grid: not exportable, or its scale not initialised yet.

    The exporter adds the layer's name and reports it as an export error.
    """


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
        """The smallest integer type (int8, uint8, int16) that holds the grid."""
        for dtype, (lo, hi) in _STORAGE.items():
            if lo <= self.low and self.high <= hi:
                return dtype
        raise NoIntegerGrid(f"no integer type holds the grid [{self.low}, {self.high}]")

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

    @staticmethod
    def integers(codes: torch.Tensor, low: int, stride: int) -> torch.Tensor:
        """The inverse of `codes`: the grid's integers from their b-bit codes (a packed file stores low, stride)."""
        return codes.to(torch.int32) * stride + low
