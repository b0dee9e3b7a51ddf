"""Two PyTorch ops that the ONNX exporter writes as QuantizeLinear / Clip / DequantizeLinear nodes.

torch.onnx (dynamo) translates a custom op through `custom_translation_table`; each op here has an eager
implementation with the same values as its ONNX translation, so the deploy network can be run in PyTorch
and compared with the fake-quant network before anything is exported.

    quantize_dequantize(x, scale, zero_point, low, high)
        ONNX: DequantizeLinear(Clip(QuantizeLinear(x, scale, zp), low, high), scale, zp)
        QuantizeLinear rounds half to even (as torch.round) and saturates to the storage type; the Clip
        narrows that to the b-bit grid and is left out when the grid fills the storage type (8 bits).
    dequantize(integers, scale, axis)
        ONNX: DequantizeLinear(integers, scale, axis=axis), per tensor (0-d scale) or per channel.
"""

from __future__ import annotations

import torch
from onnxscript import opset21 as op

OPSET = 21  # int16 storage and per-axis DequantizeLinear of every integer type


@torch.library.custom_op("qreg::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: int,
                        high: int) -> torch.Tensor:
    zero = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + zero, low, high) - zero) * scale


@quantize_dequantize.register_fake
def _(x, scale, zero_point, low, high):
    return torch.empty_like(x)


@torch.library.custom_op("qreg::dequantize", mutates_args=())
def dequantize(integers: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    if scale.dim():
        shape = [1] * integers.dim()
        shape[axis] = -1
        scale = scale.view(shape)
    return integers.to(torch.float32) * scale


@dequantize.register_fake
def _(integers, scale, axis):
    return torch.empty(integers.shape, dtype=torch.float32, device=integers.device)


def _quantize_dequantize_onnx(x, scale, zero_point, low: int, high: int):
    q = op.QuantizeLinear(x, scale, zero_point)
    q = op.Clip(q, op.CastLike(low, zero_point), op.CastLike(high, zero_point))
    return op.DequantizeLinear(q, scale, zero_point)


def _quantize_dequantize_full_onnx(x, scale, zero_point):
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


def _dequantize_onnx(integers, scale, axis: int):
    return op.DequantizeLinear(integers, scale, axis=axis)


@torch.library.custom_op("qreg::quantize_dequantize_full", mutates_args=())
def quantize_dequantize_full(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """quantize_dequantize over the whole range of zero_point's integer type (no Clip node needed)."""
    info = torch.iinfo(zero_point.dtype)
    return quantize_dequantize(x, scale, zero_point, info.min, info.max)


@quantize_dequantize_full.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


TRANSLATIONS = {
    torch.ops.qreg.quantize_dequantize.default: _quantize_dequantize_onnx,
    torch.ops.qreg.quantize_dequantize_full.default: _quantize_dequantize_full_onnx,
    torch.ops.qreg.dequantize.default: _dequantize_onnx,
}
