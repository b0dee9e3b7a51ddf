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
import threading

import torch

_HALF_PRECISION = (torch.bfloat16, torch.float16)


def in_float32(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is float32 (or float64), else a float32 copy: quantizers never compute in half precision."""
    return x.float() if x.dtype in _HALF_PRECISION else x


def _flat_views(*tensors: torch.Tensor) -> list[torch.Tensor] | None:
    """1-D views of same-shaped tensors in their common memory order (contiguous or channels_last), pairing the
    same elements, or None when they share no dense layout. `reshape(-1)` of a channels_last tensor would be a
    hidden copy; its flat view in storage order is not."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(-1) for t in tensors]
    if all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return [t.permute(0, 2, 3, 1).reshape(-1) for t in tensors]
    return None


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t in like's dense layout (a copy only when they differ: a conv's weight gradient can come back
    channels_last for a contiguous weight)."""
    channels_last = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# One flat scratch buffer per (device, dtype, thread), grown to the largest request and reused by every backward.
# On CPU a fresh activation-sized tensor is fresh pages from the kernel: writing it costs page faults and freeing
# it an munmap, so a temporary allocated per layer per step cost twice what the arithmetic into it does (0.68 vs
# 0.38 ms for a subtraction over a 128 x 16 x 32 x 32 activation). CUDA's caching allocator already reuses memory.
_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype, threading.get_ident())
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffer[:numel]


def _uses_scratch(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


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


def step_gradient_sum(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor, low, high) -> torch.Tensor:
    """sum(grad * (out - x where low < x < high, else out)): a quantizer's step gradient before 1/s, where out is
    the quantized x (round(clip(x/s)) * s, so out - x outside the range would be wrong: there it is the clipped
    level that counts).

    The difference is formed per element (summing g*out and g*x apart would cancel in float32: two large sums,
    a small difference). On CPU it is built in the reused scratch buffer in two passes, x where inside
    (hardtanh_backward of x against itself) then out minus that, and summed in one dot product."""
    flats = None
    if _uses_scratch(x) and grad.dtype == out.dtype == x.dtype:
        flats = _flat_views(_in_layout_of(grad, x), _in_layout_of(out, x), x)
    if flats is None:
        inside = (x > low) & (x < high)
        return (grad * torch.where(inside, out - x, out)).sum()
    flat_grad, flat_out, flat_x = flats
    difference = _scratch(flat_x.numel(), flat_x)
    torch.ops.aten.hardtanh_backward.grad_input(flat_x, flat_x, _number(low), _number(high), grad_input=difference)
    return torch.dot(flat_grad, torch.sub(flat_out, difference, out=difference))


def sum_where_at_least(grad: torch.Tensor, x: torch.Tensor, threshold) -> torch.Tensor:
    """sum(grad where x >= threshold)."""
    if _uses_scratch(x):
        below = _next(threshold, -math.inf, x.dtype)  # threshold_backward passes x > below
        flats = _flat_views(grad, x) if grad.dtype == x.dtype else None
        if flats is None:
            return torch.ops.aten.threshold_backward(grad, x, below).sum()
        kept = _scratch(flats[0].numel(), flats[0])
        return torch.ops.aten.threshold_backward.grad_input(*flats, below, grad_input=kept).sum()
    return torch.where(x >= threshold, grad, 0).sum()


class RoundSTE(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out
