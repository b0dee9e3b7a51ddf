"""Shared by the corruption families: the error type, numba decorator, uint8 conversion, Gaussian filter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import cv2
import numba
import numpy as np

from user_errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


class CorruptionError(UserError):
    """A caller's mistake (unknown name, severity, profile; wrong array): one line that names the fix."""


def jit(function: F) -> F:
    """numba nopython with an on-disk cache, so only the first run in a checkout pays the compile time."""
    return numba.njit(cache=True, nogil=True)(function)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """The generators' `np.uint8(np.clip(x, 0, 1) * 255)`: clip, scale in x's dtype, truncate (not round)."""
    out = np.empty(values.shape, dtype=np.uint8)
    _to_uint8_kernel(np.ascontiguousarray(values).reshape(-1), out.reshape(-1))
    return out


@jit
def _to_uint8_kernel(values, out):  # pragma: no cover - compiled
    # One pass; the product is taken in the array's own dtype, as numpy's `clip(x, 0, 1) * 255` does.
    zero = values.dtype.type(0.0)
    one = values.dtype.type(1.0)
    scale = values.dtype.type(255.0)
    for i in range(values.size):
        out[i] = np.uint8(min(max(values[i], zero), one) * scale)


def uniform_int8(rng: np.random.Generator, low: int, high: int, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform integers in [low, high) (a span of at most 128) from raw 32-bit draws, byte by byte.

    Same distribution as `rng.integers(low, high, shape, dtype=np.int8)` at about a third of its cost: power-
    of-two spans mask each byte, others reject bytes above the largest multiple of the span.
    """
    span = high - low
    count = int(np.prod(shape))
    limit = 256 - 256 % span
    pieces, needed = [], count
    while needed > 0:
        words = rng.integers(0, 1 << 32, size=(needed * 256 // limit + 64) // 4 + 1, dtype=np.uint32)
        raw = words.astype("<u4", copy=False).view(np.uint8)
        if limit < 256:
            raw = raw[raw < limit]
        raw = raw[:needed]
        pieces.append(raw)
        needed -= raw.size
    raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    values = (raw & (span - 1)) if span & (span - 1) == 0 else raw % span
    return (values.astype(np.int8) + np.int8(low)).reshape(shape)


# k / 255 in float32 for k = 0..255: what both `(x / 255.).astype(np.float32)` and `np.float32(x) / 255.`
# give (the generators use both; they agree for every k).
UNIT_FLOAT32 = np.arange(256, dtype=np.float32) / np.float32(255.0)
UNIT_FLOAT64 = np.arange(256) / 255.0


def unit_float32(images: np.ndarray) -> np.ndarray:
    """uint8 images as float32 x / 255, by table lookup (OpenCV's LUT, one pass)."""
    flat = images.reshape(-1, images.shape[-2] * images.shape[-1])
    return cv2.LUT(flat, UNIT_FLOAT32).reshape(images.shape)


def kernel_radius(sigma: float, truncate: float) -> int:
    """scipy.ndimage's Gaussian radius, so OpenCV gets exactly the taps skimage/scipy would use."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_filter(
    image: np.ndarray,
    sigma: float | tuple[float, float],
    truncate: float = 4.0,
    border: int = cv2.BORDER_REPLICATE,
) -> np.ndarray:
    """skimage.filters.gaussian over the two spatial axes (channels independent), computed by OpenCV.

    Same kernel as scipy (radius int(truncate * sigma + 0.5), normalised exp), same borders
    (scipy 'nearest' = BORDER_REPLICATE, 'reflect' = BORDER_REFLECT), several times faster. A uint8 image
    is filtered as x / 255 and comes back as float32.
    """
    sigma_y, sigma_x = (sigma, sigma) if np.isscalar(sigma) else sigma
    radius_y = kernel_radius(sigma_y, truncate) if sigma_y > 1e-15 else 0
    radius_x = kernel_radius(sigma_x, truncate) if sigma_x > 1e-15 else 0
    if image.dtype == np.uint8:  # filter x / 255 straight from uint8: the 1 / 255 rides on the kernel
        kernel_y = _gaussian_taps(sigma_y, radius_y, np.float32)
        kernel_x = _gaussian_taps(sigma_x, radius_x, np.float32) / np.float32(255.0)
        return cv2.sepFilter2D(image, cv2.CV_32F, kernel_x, kernel_y, borderType=border)
    if radius_y == 0 and radius_x == 0:
        return image.copy()
    kernel_y = _gaussian_taps(sigma_y, radius_y, image.dtype)
    kernel_x = _gaussian_taps(sigma_x, radius_x, image.dtype)
    return cv2.sepFilter2D(image, -1, kernel_x, kernel_y, borderType=border)


def _gaussian_taps(sigma: float, radius: int, dtype: np.dtype) -> np.ndarray:
    if radius == 0:
        return np.ones(1, dtype=dtype)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    return (taps / taps.sum()).astype(dtype)
