"""The int32 bias and per-channel multiplier with which an integer convolution writes a quantizer's levels.

A QLinearConv computes, per output channel, `round((acc + B) * M)` (saturated, then clipped to the b-bit grid),
where acc is the integer accumulator, B an int32 bias and M = x_scale * w_scale / y_scale in float32. The trained
model computes `round((acc + b) * m)` with a real shift b (BatchNorm's, in accumulator steps) and multiplier m.
Rounding b to the nearest integer moves every level boundary by up to half an accumulator step, which flips
outputs that lie that close to a boundary (with 2-bit weights, 1 in 2,500 per layer even with the weights spread
over int8, enough to change 10 % of a barely trained model's predictions after twenty layers).

But acc only takes integer values (multiples of `stride`, where the weights were spread), so only the integer
thresholds matter: output n+1 starts at the first reachable acc >= t_n = (n + 1/2) / m - b. For the few
thresholds of a b-bit grid a nearby integer B and multiplier M that put every threshold at the same reachable
acc usually exist; they are searched here and checked in the float32 arithmetic ONNX Runtime uses, and the
plain rounding is kept where none is found.
"""

from __future__ import annotations

import math

import numpy as np


def _writes_levels(bias: int, multiplier: np.float32, starts: np.ndarray, halves: np.ndarray, stride: int) -> bool:
    """Whether round((acc + bias) * multiplier) in float32 crosses each boundary `halves` first at `starts`."""
    at = (starts + bias).astype(np.float32) * multiplier
    before = (starts - stride + bias).astype(np.float32) * multiplier
    return bool(np.all(at > halves) and np.all(before < halves))  # strictly: a tie rounds to even


def exact_bias(multiplier: float, shift: float, low: int, high: int, stride: int,
               float32_multiplier) -> tuple[int, float] | None:
    """(B, M) with which round((acc + B) * M) gives every level where round((acc + shift) * multiplier) does, for
    every acc that is a multiple of `stride`; None where no nearby integer B has such an M.

    `low`, `high`: the grid's integers (their high - low boundaries are matched). `float32_multiplier(M)` gives
    the float32 multiplier ONNX Runtime will compute from M (the check runs in that arithmetic). A negative
    multiplier (a channel whose BatchNorm factor is negative) is solved on -acc.
    """
    sign = 1.0 if multiplier > 0 else -1.0
    multiplier, shift = sign * multiplier, sign * shift
    halves = np.arange(low, high) + 0.5
    # the first reachable accumulator (a multiple of `stride`) at which each next level starts
    starts = stride * np.ceil((halves / multiplier - shift) / stride)
    for bias in sorted({math.floor(shift), math.ceil(shift)}, key=lambda b: abs(b - shift)):
        # the reciprocal u = 1/M must put each boundary (n + 1/2) u - bias in (start_n - stride, start_n]
        # (dividing by a negative n + 1/2, on a signed grid, swaps the interval's ends)
        ends = np.stack([(starts - stride + bias) / halves, (starts + bias) / halves])
        low, high = np.max(ends.min(axis=0)), np.min(ends.max(axis=0))
        if not low < high:
            continue
        candidate = 2.0 / (low + high)
        actual = np.float32(float32_multiplier(sign * candidate)) * sign
        if _writes_levels(bias, np.float32(actual), starts, halves, stride):
            return int(sign * bias), sign * candidate
    return None
