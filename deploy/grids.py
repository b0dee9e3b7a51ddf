"""The integer grid behind each fake quantizer, as the exporters read it: from the quantizer itself.

Every quantizer qreg trains produces levels `integer * scale` (zero point 0) on a grid of evenly spaced
integers, which is what ONNX's QuantizeLinear / DequantizeLinear compute and what the packed format stores.
Each quantizer states its own grid (`Quantizer.integer_grid`: scale, integer range, stride, axis), so nothing
here knows a quantizer class; `IntegerGrid.storage` picks the ONNX integer type that holds it (int16 for
DoReFa's odd integers at 8 bits, which reach +-255). The integers of a trained layer are read off its
quantizer's own output (`round(Q(w) / scale)`), so the grids can never drift from what training computed; a
weight that does not land on its grid is a bug and stops the export.
"""

from __future__ import annotations

import torch
from torch import nn

from deploy.errors import ExportError
from quantizers import IntegerGrid, NoIntegerGrid, Quantizer

__all__ = ["activation_grid", "weight_grid", "weight_integers"]


def _grid(quantizer: nn.Module, role: str, name: str, weight: torch.Tensor | None = None) -> IntegerGrid | None:
    layer = name or "a layer"
    if not isinstance(quantizer, Quantizer):
        raise ExportError(f"{layer}: no integer grid is known for {role} quantizer {type(quantizer).__name__}")
    try:
        return quantizer.integer_grid(weight)
    except NoIntegerGrid as error:
        raise ExportError(f"{layer}: {error}") from None


def weight_grid(layer: nn.Module, name: str = "") -> IntegerGrid | None:
    """The grid of a quantized layer's weights, or None where the deployed weights stay float."""
    quantizer = layer.weight_quantizer
    if quantizer is None:
        return None
    return _grid(quantizer, "weight", name, layer.weight.detach())


def activation_grid(layer: nn.Module, name: str = "") -> IntegerGrid | None:
    """The grid of a quantized layer's input, or None where its input stays float."""
    quantizer = layer.input_quantizer
    if quantizer is None:
        return None
    return _grid(quantizer, "input", name)


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
