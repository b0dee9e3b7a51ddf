"""Gaussian, glass, defocus, motion and zoom blur, plus the motion-blur and zoom primitives snow reuses.

Deterministic filters run on the whole batch (OpenCV per image, no Python loop over pixels); the sequential
parts (glass blur's pixel copies, motion blur's taps, zoom blur's bilinear layers) are compiled numba loops
over the batch. Arithmetic mirrors the generators (x / 255, clip, x 255, truncate) in float32 unless noted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from datamodules.corruptions._common import gaussian_filter, jit, to_uint8, uniform_int8, unit_float32
from datamodules.corruptions.profiles import DefocusBlur, GlassBlur, MotionBlur, ZoomBlur

# ---------------------------------------------------------------- gaussian blur


def gaussian_blur(images: np.ndarray, sigma: float, rngs: None, profile: str) -> np.ndarray:
    """skimage.filters.gaussian(x / 255, sigma, channel_axis=-1): mode 'nearest', truncate 4."""
    out = np.empty_like(images)
    for image, target in zip(images, out, strict=True):
        target[...] = to_uint8(gaussian_filter(image, sigma))
    return out


# ---------------------------------------------------------------- glass blur


@jit
def _glass_copy_kernel(images, offsets, delta):  # pragma: no cover - compiled
    # The generators write `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views: the right-hand side
    # holds views, so the first assignment overwrites the pixel the second one reads and the "swap" is a
    # copy x[h, w] <- x[h', w']. Both the CIFAR-10-C loop and the fork's numba loop behave so; we copy.
    count, height, width, channels = images.shape
    iterations, rows, cols = offsets.shape[1], offsets.shape[2], offsets.shape[3]
    for n in range(count):
        for it in range(iterations):
            for a in range(rows):
                h = height - delta - a
                for b in range(cols):
                    w = width - delta - b
                    dx = offsets[n, it, a, b, 0]
                    dy = offsets[n, it, a, b, 1]
                    for c in range(channels):
                        images[n, h, w, c] = images[n, h + dy, w + dx, c]


def glass_copy_pixels(images: np.ndarray, offsets: np.ndarray, delta: int) -> None:
    """The generators' local pixel shuffle, in place; offsets[n, iteration, row, col] = (dx, dy).

    Positions run h = H - delta .. delta + 1 (descending), w likewise, sequentially, so later positions
    read pixels already moved, exactly as the reference loop does.
    """
    _glass_copy_kernel(images, offsets, int(delta))


def glass_blur(images: np.ndarray, params: GlassBlur, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """Gaussian blur -> uint8 -> sequential local pixel copies with offsets in [-d, d-1] -> Gaussian blur."""
    count, height, width, _ = images.shape
    delta, iterations = int(params.max_delta), int(params.iterations)
    rows, cols = max(height - 2 * delta, 0), max(width - 2 * delta, 0)
    blurred = np.empty_like(images)
    for image, target in zip(images, blurred, strict=True):
        target[...] = to_uint8(gaussian_filter(image, params.sigma))
    # numpy's randint(-d, d, size=2) per position: (dx, dy), both in [-d, d - 1].
    offsets = np.empty((count, iterations, rows, cols, 2), dtype=np.int8)
    for n, rng in enumerate(rngs):
        offsets[n] = uniform_int8(rng, -delta, delta, offsets.shape[1:])
    glass_copy_pixels(blurred, offsets, delta)
    out = np.empty_like(images)
    for image, target in zip(blurred, out, strict=True):
        target[...] = to_uint8(gaussian_filter(image, params.sigma))
    return out


# ---------------------------------------------------------------- defocus blur


@lru_cache(maxsize=32)
def defocus_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The generators' anti-aliased disk, with its all-zero margin cropped (same taps, smaller filter)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xs, ys = np.meshgrid(grid, grid)
    disk = np.array((xs**2 + ys**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    kernel = cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)
    # The 3x3 blur of a small alias sigma leaves subnormal corner taps (e^-100 ~ 1e-44): worth nothing, but
    # x86 multiplies by subnormals ~25x slower. Flushing them changes results by < 1e-40.
    kernel[np.abs(kernel) < np.finfo(np.float32).tiny] = 0
    nonzero_rows = np.flatnonzero(kernel.any(axis=1))
    nonzero_cols = np.flatnonzero(kernel.any(axis=0))
    margin = min(
        nonzero_rows[0],
        nonzero_cols[0],
        len(kernel) - 1 - nonzero_rows[-1],
        len(kernel) - 1 - nonzero_cols[-1],
    )
    return np.ascontiguousarray(kernel[margin : len(kernel) - margin, margin : len(kernel) - margin])


def defocus_blur(images: np.ndarray, params: DefocusBlur, rngs: None, profile: str) -> np.ndarray:
    """Disk kernel filtered per channel with OpenCV's filter2D (border reflect-101)."""
    kernel = defocus_kernel(float(params.radius), float(params.alias_blur))
    out = np.empty_like(images)
    for image, target in zip(images, out, strict=True):
        target[...] = to_uint8(correlate_reflect101(unit_float32(image), kernel))
    return out


# OpenCV's filter2D switches float32 kernels of this many taps or more to a DFT, which for kernels up to
# _BANDED_TAPS taps is 2x slower here than direct correlation in row bands (beyond that the DFT wins).
_DIRECT_TAPS = 130
_BANDED_TAPS = 256


def correlate_reflect101(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D(image, -1, kernel) for a centred odd kernel, border reflect-101.

    Kernels between OpenCV's DFT threshold and _BANDED_TAPS taps are split into row bands (cropped to their
    nonzero columns) that each stay on OpenCV's direct path; the bands are correlated with the image padded
    once, and their results added.
    """
    size = kernel.shape[0]
    if size * kernel.shape[1] < _DIRECT_TAPS or size * kernel.shape[1] > _BANDED_TAPS:
        return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    radius = size // 2
    height, width = image.shape[:2]
    padded = cv2.copyMakeBorder(image, radius, radius, radius, radius, cv2.BORDER_REFLECT_101)
    rows_per_band = max(1, (_DIRECT_TAPS - 1) // kernel.shape[1])
    out = None
    for top in range(0, size, rows_per_band):
        band = kernel[top : top + rows_per_band]
        columns = np.flatnonzero(band.any(axis=0))
        if columns.size == 0:
            continue
        left, right = columns[0], columns[-1] + 1
        piece = np.ascontiguousarray(band[:, left:right])
        filtered = cv2.filter2D(padded, -1, piece, anchor=(0, 0), borderType=cv2.BORDER_REFLECT_101)
        window = filtered[top : top + height, left : left + width]
        out = window.copy() if out is None else cv2.add(out, window)
    return out


# ---------------------------------------------------------------- motion blur


@jit
def _motion_kernel(image, weights, offsets_y, offsets_x, out):  # pragma: no cover - compiled
    # out[y, x] = sum_t weights[t] * image[clamp(y + oy_t), clamp(x + ox_t)], taps added in order. The
    # interior of each row is a contiguous slice, so LLVM vectorises it.
    height, width, channels = image.shape
    source = image.reshape(height, width * channels)
    target = out.reshape(height, width * channels)
    target[:, :] = 0.0
    last = (width - 1) * channels
    for t in range(weights.size):
        weight = weights[t]
        shift = offsets_x[t] * channels
        lo = min(max(-offsets_x[t], 0), width) * channels
        hi = max(min(width - offsets_x[t], width) * channels, lo)
        for y in range(height):
            sy = min(max(y + offsets_y[t], 0), height - 1)
            row = target[y]
            for j in range(lo):
                row[j] += weight * source[sy, j % channels]
            inner = row[lo:hi]
            shifted = source[sy, lo + shift : hi + shift]
            for j in range(hi - lo):
                inner[j] += weight * shifted[j]
            for j in range(hi, width * channels):
                row[j] += weight * source[sy, last + j % channels]


def motion_taps(radius: float, sigma: float, angle: float, height: int, width: int) -> tuple[np.ndarray, ...]:
    """ImageMagick's MotionBlurImage kernel: width 2*ceil(r)+1, k[i] ~ exp(-i^2 / 2 sigma^2), normalised.

    Tap i reads the pixel at (ceil(i sin a - 0.5), ceil(i cos a - 0.5)) from the output pixel (rows, cols);
    taps that would leave the image entirely are dropped, as the fork does.
    """
    taps = 2 * math.ceil(radius) + 1
    index = np.arange(taps)
    weights = np.exp(-((index - 0) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    weights = weights / np.sum(weights)
    point = (taps * np.sin(np.deg2rad(angle)), taps * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    offsets_y, offsets_x = [], []
    for i in range(taps):
        oy = math.ceil(((i * point[0]) / hypot) - 0.5)
        ox = math.ceil(((i * point[1]) / hypot) - 0.5)
        if abs(oy) >= height or abs(ox) >= width:
            break
        offsets_y.append(oy)
        offsets_x.append(ox)
    used = len(offsets_y)
    return weights[:used], np.array(offsets_y, dtype=np.int64), np.array(offsets_x, dtype=np.int64)


def motion_blur_image(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Motion-blur one HxWxC (or HxW) array; float32 result in the input's units, edges replicated.

    Accumulates in float32 (the fork uses float64): 2x faster, and differences stay below 1e-3 of a level.
    """
    planar = image.ndim == 2
    source = image[:, :, None] if planar else image
    source = np.ascontiguousarray(source)
    weights, offsets_y, offsets_x = motion_taps(radius, sigma, angle, source.shape[0], source.shape[1])
    out = np.empty(source.shape, dtype=np.float32)
    weights = weights.astype(np.float32)
    _motion_kernel(source, weights, offsets_y, offsets_x, out)
    return out[:, :, 0] if planar else out


@jit
def _levels_to_uint8_kernel(values, offset, out):  # pragma: no cover - compiled
    # clip to 0..255, add 0.5 to round (cifar, ImageMagick's 8-bit output) or 0 to truncate (the fork).
    for i in range(values.size):
        out[i] = np.uint8(min(max(values[i], np.float32(0.0)), np.float32(255.0)) + np.float32(offset))


def motion_blur(
    images: np.ndarray, params: MotionBlur, rngs: Sequence[np.random.Generator], profile: str
) -> np.ndarray:
    """Angle U(-45, 45) per image; cifar rounds to nearest (ImageMagick's 8-bit PNG), imagenet truncates."""
    out = np.empty_like(images)
    for image, target, rng in zip(images, out, rngs, strict=True):
        blurred = motion_blur_image(image, params.radius, params.sigma, rng.uniform(-45, 45))
        _levels_to_uint8_kernel(blurred.reshape(-1), 0.5 if profile == "cifar" else 0.0, target.reshape(-1))
    return out


# ---------------------------------------------------------------- zoom blur


@jit
def _zoom_sum_kernel(
    images, row_lo, row_hi, row_weight, row_valid, run_start, run_stop, run_shift, run_count, column_weight, out
):  # pragma: no cover - compiled
    # out[n, r, c] += sum over factors f of bilinear(images[n]) at that factor's sampling, computed in out's
    # dtype (scipy interpolates in float64 and rounds each layer to the image's float32: float32 arithmetic
    # here moves a result by ~1e-7, and is 1.6x faster). Per output row: a contiguous lerp of two source
    # rows, then the lerp along the row in runs of output columns that read the row at a constant shift
    # (zoom >= 1 makes the source column step 0 or 1), so both passes vectorise.
    count, height, width, channels = images.shape
    factors = row_lo.shape[0]
    out_rows = out.shape[1]
    flat = out.shape[2] * channels
    one = out.dtype.type(1.0)
    row = np.zeros((width + 1) * channels, dtype=out.dtype)  # one spare pixel of zeros: see zoom_runs
    for f in range(factors):
        weights = column_weight[f]
        lo_j = width * channels
        hi_j = 0
        for q in range(run_count[f]):
            lo_j = min(lo_j, run_start[f, q] + run_shift[f, q])
            hi_j = max(hi_j, run_stop[f, q] + run_shift[f, q] + channels)
        hi_j = min(hi_j, width * channels)
        for n in range(count):
            source = images[n].reshape(height, width * channels)
            target = out[n].reshape(out_rows, flat)
            for r in range(out_rows):
                if not row_valid[f, r]:
                    continue
                w = out.dtype.type(row_weight[f, r])
                top = source[row_lo[f, r]]
                bottom = source[row_hi[f, r]]
                for j in range(lo_j, hi_j):
                    row[j] = (one - w) * top[j] + w * bottom[j]
                destination = target[r]
                for q in range(run_count[f]):
                    a = run_start[f, q]
                    b = run_stop[f, q]
                    shift = run_shift[f, q]
                    part = destination[a:b]
                    weight = weights[a:b]
                    left = row[a + shift : b + shift]
                    right = row[a + shift + channels : b + shift + channels]
                    for e in range(b - a):
                        part[e] += (one - weight[e]) * left[e] + weight[e] * right[e]


@lru_cache(maxsize=512)
def zoom_axis(size: int, factor: float, keep: str) -> tuple[np.ndarray, ...]:
    """Sampling of scipy.ndimage.zoom(order=1) on the centre crop ceil(size / factor) along one axis.

    keep: 'centre' trims the zoomed axis to `size` around its centre (CIFAR-10-C's clipped_zoom), 'top_left'
    keeps its first `size` samples (the fork's `[:h, :w]`), 'all' keeps every zoomed sample. A sample whose
    coordinate overshoots the crop by rounding is 0, as scipy's constant mode makes it.
    """
    crop = int(np.ceil(size / float(factor)))
    top = (size - crop) // 2
    zoomed = int(round(crop * factor))
    coefficient = (crop - 1) / (zoomed - 1) if zoomed > 1 else 1.0
    if keep == "centre":
        first, count = (zoomed - size) // 2, size
    elif keep == "top_left":
        first, count = 0, size
    else:
        first, count = 0, zoomed
    coordinates = np.arange(first, first + count, dtype=np.float64) * coefficient
    valid = coordinates <= crop - 1
    lo = np.floor(coordinates).astype(np.int64)
    weight = coordinates - lo
    lo = np.minimum(lo, crop - 1)
    hi = np.minimum(lo + 1, crop - 1)
    return lo + top, hi + top, weight, valid


@lru_cache(maxsize=512)
def zoom_runs(size: int, factor: float, keep: str, channels: int) -> tuple[np.ndarray, ...]:
    """Column sampling of zoom_axis as runs over the flattened (column, channel) axis of a row.

    Output columns c with the same lo[c] - c (and hi[c] = lo[c] + 1) form a run reading row[e + shift] and
    row[e + shift + channels]. Columns that scipy sets to 0 are left out (adding 0 changes nothing). Where hi
    is clamped to lo the weight is exactly 0, so reading the next pixel (or the spare zero pixel past the row
    end) adds 0 * finite = 0, the same as scipy.
    """
    lo, hi, weight, valid = zoom_axis(size, factor, keep)
    shift = lo - np.arange(len(lo))
    key = np.where(valid, shift * 2 + (hi != lo + 1), np.iinfo(np.int64).min)
    bounds = np.flatnonzero(np.diff(key)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(lo)]])
    keep_run = valid[starts]
    starts, stops = starts[keep_run], stops[keep_run]
    return (
        starts * channels,
        stops * channels,
        shift[starts] * channels,
        np.repeat(weight, channels),
    )


def _stacked_sampling(
    height: int, width: int, channels: int, factors: Sequence[float], keep: str, dtype: type = np.float64
) -> list:
    rows = [np.stack(parts) for parts in zip(*[zoom_axis(height, float(f), keep) for f in factors], strict=True)]
    runs = [zoom_runs(width, float(f), keep, channels) for f in factors]
    count = np.array([len(r[0]) for r in runs], dtype=np.int64)
    longest = int(count.max())
    starts, stops, shifts = (np.zeros((len(runs), longest), dtype=np.int64) for _ in range(3))
    for f, (start, stop, shift, _) in enumerate(runs):
        starts[f, : len(start)], stops[f, : len(stop)], shifts[f, : len(shift)] = start, stop, shift
    weights = np.stack([r[3] for r in runs]).astype(dtype)
    return [*rows, starts, stops, shifts, count, weights]


def clipped_zoom(images: np.ndarray, factor: float, keep: str, dtype: type = np.float64) -> np.ndarray:
    """scipy.ndimage.zoom(order=1) of each image's centre crop (NxHxWxC), cropped as `keep` says."""
    count, height, width, channels = images.shape
    sampling = _stacked_sampling(height, width, channels, [factor], keep, dtype)
    out_height = sampling[0].shape[1]
    out_width = sampling[-1].shape[1] // channels
    out = np.zeros((count, out_height, out_width, channels), dtype=dtype)
    _zoom_sum_kernel(np.ascontiguousarray(images), *sampling, out)
    return out


def zoom_factors(params: ZoomBlur) -> np.ndarray:
    return np.arange(params.start, params.stop, params.step)


def zoom_blur(images: np.ndarray, params: ZoomBlur, rngs: None, profile: str) -> np.ndarray:
    """(x + sum over factors of clipped_zoom(x, z)) / (n + 1), in float32 as the generators accumulate it."""
    factors = zoom_factors(params)
    keep = "centre" if profile == "cifar" else "top_left"
    unit = unit_float32(images)
    # Every table starts at factor 1, which scipy.ndimage.zoom returns unchanged: that layer is x itself.
    identity = factors[0] == 1.0
    accumulated = unit.copy() if identity else np.zeros_like(unit)
    resampled = factors[1:] if identity else factors
    if len(resampled):
        sampling = _stacked_sampling(images.shape[1], images.shape[2], images.shape[3], resampled, keep, np.float32)
        _zoom_sum_kernel(unit, *sampling, accumulated)
    out = np.empty_like(images)
    _average_to_uint8_kernel(unit.reshape(-1), accumulated.reshape(-1), np.float32(len(factors) + 1), out.reshape(-1))
    return out


@jit
def _average_to_uint8_kernel(unit, accumulated, layers, out):  # pragma: no cover - compiled
    # to_uint8((x + sum) / (n + 1)) in one pass, every step in float32 as numpy does it.
    for i in range(unit.size):
        value = (unit[i] + accumulated[i]) / layers
        out[i] = np.uint8(min(max(value, np.float32(0.0)), np.float32(1.0)) * np.float32(255.0))
