"""Straight-through gradient helpers shared by the quantizers' autograd Functions.

Fake-quant backward passes are dominated by "gradient where low < x < high, else 0". On CPU, PyTorch's
comparison ops write a bool tensor slowly and a masked multiply costs another pass, while
`hardtanh_backward` does exactly this in one vectorised pass (about 4x faster on 2M elements). It takes
Python-number bounds, which would force a device sync per layer on CUDA, so GPUs use the mask form, and so
does torch.compile, which fuses the comparisons into its generated kernel anyway.

Under mixed precision (autocast) the activations reaching a quantizer are bfloat16 or float16. Rounding
`x / s` there would put values on the wrong level (bfloat16 keeps 8 significant bits), so every quantizer
computes in float32 (`in_float32`) and casts its result back to the input's dtype, which is what autocast's
next conv expects; gradients to steps and alphas are summed in float32 too.
"""

from __future__ import annotations

import math

import torch

_HALF_PRECISION = (torch.bfloat16, torch.float16)


def in_float32(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is float32 (or float64), else a float32 copy: quantizers never compute in half precision."""
    return x.float() if x.dtype in _HALF_PRECISION else x


def dot_in_memory_order(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) as one dot product over the tensors' storage, without copying channels_last tensors.

    `reshape(-1)` of a channels_last tensor is a hidden copy; when both tensors share a dense layout, the flat
    view in that layout's order pairs the same elements.
    """
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    last = torch.channels_last
    if a.dim() == 4 and a.is_contiguous(memory_format=last) and b.is_contiguous(memory_format=last):
        return torch.dot(a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1))
    return (a * b).sum()


def _number(value: torch.Tensor | float) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _next(value, direction: float, dtype: torch.dtype) -> float:
    """The neighbour of `value` towards `direction` in `dtype` (a float64 neighbour would round back)."""
    here = torch.tensor(_number(value), dtype=dtype)
    return torch.nextafter(here, torch.tensor(direction, dtype=dtype)).item()


def pass_between(
    grad: torch.Tensor, x: torch.Tensor, low, high, include_low: bool = False, include_high: bool = False
) -> torch.Tensor:
    """`grad` where x lies between low and high (each end open unless included), 0 elsewhere."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # hardtanh_backward passes low < x < high; a closed end is the open end at the next float outward.
        low = _next(low, -math.inf, x.dtype) if include_low else _number(low)
        high = _next(high, math.inf, x.dtype) if include_high else _number(high)
        return torch.ops.aten.hardtanh_backward(grad, x, low, high)
    above_low = x >= low if include_low else x > low
    below_high = x <= high if include_high else x < high
    return grad * (above_low & below_high)


def clamp_between(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """clamp(x, low, high) for 0-dim tensor bounds (a step times a grid end, PACT's alpha).

    On CPU a clamp against two tensor bounds takes PyTorch's generic broadcasting path, 5x slower than
    clamp_min then clamp_max_ against the same 0-dim tensors (1.5 vs 0.28 ms on a 128 x 16 x 32 x 32
    activation), and it was most of an LSQ layer's forward. Same values; no bound is read on the host (a
    training step makes no device sync, tests/test_training_step_sync.py). GPUs keep the one-kernel clamp."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return x.clamp_min(low).clamp_max_(high)
    return torch.clamp(x, low, high)


def sum_where_at_least(grad: torch.Tensor, x: torch.Tensor, threshold) -> torch.Tensor:
    """sum(grad where x >= threshold)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.ops.aten.threshold_backward(grad, x, _next(threshold, -math.inf, x.dtype)).sum()
    return torch.where(x >= threshold, grad, 0).sum()


class RoundSTE(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out
