"""Brightness, contrast, saturate, JPEG, pixelate and the elastic transform.

HSV adjustments are one compiled pass per pixel with skimage's rgb2hsv/hsv2rgb formulas in float64 (same
tie-breaking: blue beats green beats red for the hue). Contrast is a per-image, per-channel lookup table.
JPEG and pixelate go through Pillow exactly as the generators do (one image at a time: Pillow has no batch).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from datamodules.corruptions._common import UNIT_FLOAT64, gaussian_filter, jit, unit_float32
from datamodules.corruptions.profiles import Elastic, ElasticSized, Saturate

# ---------------------------------------------------------------- HSV: brightness and saturate


@jit
def _hsv_adjust_kernel(pixels, channel, multiply, add, unit, out):  # pragma: no cover - compiled
    # channel 2: V = clip(V * multiply + add); channel 1: S likewise. skimage's formulas, float64; x / 255 by
    # table (the same values, three divisions fewer per pixel).
    for i in range(pixels.shape[0]):
        r = unit[pixels[i, 0]]
        g = unit[pixels[i, 1]]
        b = unit[pixels[i, 2]]
        v = max(r, max(g, b))
        delta = v - min(r, min(g, b))
        h = 0.0
        s = 0.0
        if delta != 0.0:
            s = delta / v
            if r == v:
                h = (g - b) / delta
            if g == v:
                h = 2.0 + (b - r) / delta
            if b == v:
                h = 4.0 + (r - g) / delta
            h = h / 6.0
            if h < 0.0:  # numpy's (h / 6) % 1.0 for h / 6 in (-1/6, 1): fmod is h, then + 1 when negative
                h += 1.0
        if channel == 2:
            v = min(max(v * multiply + add, 0.0), 1.0)
        else:
            s = min(max(s * multiply + add, 0.0), 1.0)
        sector = np.floor(h * 6)
        f = h * 6 - sector
        p = v * (1 - s)
        q = v * (1 - f * s)
        t = v * (1 - (1 - f) * s)
        hi = int(sector) % 6
        if hi == 0:
            r, g, b = v, t, p
        elif hi == 1:
            r, g, b = q, v, p
        elif hi == 2:
            r, g, b = p, v, t
        elif hi == 3:
            r, g, b = p, q, v
        elif hi == 4:
            r, g, b = t, p, v
        else:
            r, g, b = v, p, q
        out[i, 0] = np.uint8(min(max(r, 0.0), 1.0) * 255.0)
        out[i, 1] = np.uint8(min(max(g, 0.0), 1.0) * 255.0)
        out[i, 2] = np.uint8(min(max(b, 0.0), 1.0) * 255.0)


def _hsv_adjust(images: np.ndarray, channel: int, multiply: float, add: float) -> np.ndarray:
    out = np.empty_like(images)
    _hsv_adjust_kernel(images.reshape(-1, 3), channel, float(multiply), float(add), UNIT_FLOAT64, out.reshape(-1, 3))
    return out


def brightness(images: np.ndarray, shift: float, rngs: None, profile: str) -> np.ndarray:
    """HSV value + c, clipped."""
    return _hsv_adjust(images, 2, 1.0, shift)


def saturate(images: np.ndarray, params: Saturate, rngs: None, profile: str) -> np.ndarray:
    """HSV saturation * multiply + add, clipped (multiply < 1 desaturates)."""
    return _hsv_adjust(images, 1, params.multiply, params.add)


# ---------------------------------------------------------------- contrast


def contrast(images: np.ndarray, factor: float, rngs: None, profile: str) -> np.ndarray:
    """(x - mean) * c + mean with the per-image, per-channel mean, via a 256-entry table per channel."""
    count, height, width, _ = images.shape
    sums = np.zeros((count, 3), dtype=np.int64)
    _channel_sums_kernel(images, sums)
    means = sums / (height * width) / 255.0  # (N, 3)
    levels = np.arange(256) / 255.0
    tables = (levels[None, None, :] - means[:, :, None]) * factor + means[:, :, None]  # (N, 3, 256)
    tables = (np.clip(tables, 0, 1) * 255).astype(np.uint8)
    out = np.empty_like(images)
    _lookup_kernel(images, tables, out)
    return out


@jit
def _channel_sums_kernel(images, sums):  # pragma: no cover - compiled
    count, height, width, channels = images.shape
    for n in range(count):
        pixels = images[n].reshape(-1, channels)
        for i in range(pixels.shape[0]):
            for c in range(channels):
                sums[n, c] += pixels[i, c]


@jit
def _lookup_kernel(images, tables, out):  # pragma: no cover - compiled
    count, height, width, channels = images.shape
    for n in range(count):
        for y in range(height):
            for x in range(width):
                for c in range(channels):
                    out[n, y, x, c] = tables[n, c, images[n, y, x, c]]


# ---------------------------------------------------------------- JPEG and pixelate


def jpeg_compression(images: np.ndarray, quality: int, rngs: None, profile: str) -> np.ndarray:
    """Pillow JPEG encode/decode at the given quality (Pillow's defaults otherwise: 4:2:0, baseline)."""
    out = np.empty_like(images)
    for image, target in zip(images, out, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            target[...] = np.asarray(decoded.convert("RGB"))
    return out


def pixelate(images: np.ndarray, fraction: float, rngs: None, profile: str) -> np.ndarray:
    """Pillow resize down to int(size * c) with BOX, back up with BOX (cifar) or NEAREST (imagenet)."""
    count, height, width, _ = images.shape
    small = (int(width * fraction), int(height * fraction))
    up = Image.Resampling.BOX if profile == "cifar" else Image.Resampling.NEAREST
    out = np.empty_like(images)
    for image, target in zip(images, out, strict=True):
        reduced = Image.fromarray(image).resize(small, Image.Resampling.BOX)
        target[...] = np.asarray(reduced.resize((width, height), up))
    return out


# ---------------------------------------------------------------- elastic transform


@jit
def _reflect(index, size):  # pragma: no cover - compiled
    if size == 1:
        return 0
    period = 2 * size
    index = index % period
    if index >= size:
        index = period - 1 - index
    return index


@jit
def _sample_reflect_kernel(images, shift_y, shift_x, out):  # pragma: no cover - compiled
    # scipy.ndimage.map_coordinates(order=1, mode='reflect') at (y + dy, x + dx): bilinear on the
    # half-sample-symmetric extension, float64, result rounded to float32 (the image's dtype), then
    # clip * 255 and truncate.
    count, height, width, channels = images.shape
    row = width * channels
    for n in range(count):
        source = images[n].reshape(-1)
        target = out[n].reshape(-1)
        for y in range(height):
            for x in range(width):
                yy = y + np.float64(shift_y[n, y, x])
                xx = x + np.float64(shift_x[n, y, x])
                ya = math.floor(yy)
                xa = math.floor(xx)
                wy = yy - ya
                wx = xx - xa
                yb = ya + 1
                xb = xa + 1
                if ya < 0 or yb >= height:
                    ya = _reflect(ya, height)
                    yb = _reflect(yb, height)
                if xa < 0 or xb >= width:
                    xa = _reflect(xa, width)
                    xb = _reflect(xb, width)
                top_left = ya * row + xa * channels
                top_right = ya * row + xb * channels
                bottom_left = yb * row + xa * channels
                bottom_right = yb * row + xb * channels
                at = (y * width + x) * channels
                for c in range(channels):
                    top = (1.0 - wx) * source[top_left + c] + wx * source[top_right + c]
                    bottom = (1.0 - wx) * source[bottom_left + c] + wx * source[bottom_right + c]
                    value = np.float32((1.0 - wy) * top + wy * bottom)
                    value = min(max(value, np.float32(0.0)), np.float32(1.0))
                    target[at + c] = np.uint8(value * np.float32(255.0))


def sample_reflect(images: np.ndarray, shift_y: np.ndarray, shift_x: np.ndarray) -> np.ndarray:
    """Bilinear resampling of float32 NxHxWxC images at (y + shift_y, x + shift_x), reflect -> uint8."""
    out = np.empty(images.shape, dtype=np.uint8)
    _sample_reflect_kernel(images, shift_y, shift_x, out)
    return out


def _affine(image: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C's random affine: three points around the centre moved by U(-jitter, jitter)."""
    shape_size = image.shape[:2]
    centre = np.float32(shape_size) // 2
    square = min(shape_size) // 3
    source = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    target = source + rng.uniform(-jitter, jitter, size=source.shape).astype(np.float32)
    matrix = cv2.getAffineTransform(source, target)
    return cv2.warpAffine(image, matrix, shape_size[::-1], borderMode=cv2.BORDER_REFLECT_101)


def elastic_transform(
    images: np.ndarray, params: Elastic | ElasticSized, rngs: Sequence[np.random.Generator], profile: str
) -> np.ndarray:
    """Smoothed random displacement fields (and, cifar, a random affine first), bilinear with reflect borders.

    cifar: fields U(-1, 1) smoothed with sigma (px, truncate 3, reflect) times alpha. imagenet (the fork):
    fields U(-0.005 H, 0.005 H) smoothed with sigma (0.01 H, 0.01 W) times alpha; no affine step.
    """
    count, height, width, _ = images.shape
    unit = unit_float32(images)
    shift_y = np.empty((count, height, width), dtype=np.float32)
    shift_x = np.empty_like(shift_y)
    if isinstance(params, Elastic):
        sigma, bound = params.sigma, 1.0
    else:
        sigma = (height * params.sigma_fraction, width * params.sigma_fraction)
        bound = height * params.bound_fraction
    for n, rng in enumerate(rngs):
        if isinstance(params, Elastic):
            unit[n] = _affine(unit[n], params.affine, rng)
        for field in (shift_x, shift_y):  # dx is drawn first, then dy
            # The generators smooth the float64 field and round it to float32 afterwards; smoothing in float32
            # moves displacements by ~1e-6 px and halves the cost.
            noise = rng.uniform(-bound, bound, size=(height, width)).astype(np.float32)
            field[n] = gaussian_filter(noise, sigma, truncate=3.0, border=cv2.BORDER_REFLECT) * np.float32(params.alpha)
    return sample_reflect(unit, shift_y, shift_x)
