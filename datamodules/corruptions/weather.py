"""Snow, frost, fog and spatter: random layers composited over the image.

Random draws come from each image's Generator in the order the generators make them (snow: the layer, then
the blur angle; frost: texture, then the crop corner; fog: the plasma fractal level by level; spatter: the
liquid layer). Compositing runs on the whole batch where shapes allow.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from datamodules.corruptions._common import UNIT_FLOAT32, UNIT_FLOAT64, CorruptionError, gaussian_filter, jit
from datamodules.corruptions.blur import clipped_zoom, motion_blur_image
from datamodules.corruptions.profiles import Fog, Frost, Snow, Spatter

FROST_TEXTURES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")

# ---------------------------------------------------------------- snow


@jit
def _fill_normal(rng, loc, scale, out):  # pragma: no cover - compiled
    flat = out.reshape(-1)
    for i in range(flat.size):
        flat[i] = loc + scale * rng.standard_normal()


def normal_layer(rng: np.random.Generator, loc: float, scale: float, height: int, width: int) -> np.ndarray:
    """N(loc, scale) of shape HxW drawn in C order from `rng` (a compiled loop: 3x numpy's speed here)."""
    out = np.empty((height, width), dtype=np.float64)
    _fill_normal(rng, float(loc), float(scale), out)
    return out


@jit
def _snow_composite_kernel(images, levels, blend, unit32, unit64, out):  # pragma: no cover - compiled
    # x = blend * x + (1 - blend) * max(x, grey(x) * 1.5 + 0.5) in float32 (x = uint8 / 255 as float32, grey
    # with OpenCV's RGB2GRAY weights), then + layer + layer rotated 180 degrees in float64, clip, truncate.
    count, height, width, _ = images.shape
    keep = np.float32(blend)
    lift = np.float32(1 - blend)
    for n in range(count):
        for y in range(height):
            for x in range(width):
                r = unit32[images[n, y, x, 0]]
                g = unit32[images[n, y, x, 1]]
                b = unit32[images[n, y, x, 2]]
                grey = r * np.float32(0.299) + g * np.float32(0.587) + b * np.float32(0.114)
                floor = grey * np.float32(1.5) + np.float32(0.5)
                snow = unit64[levels[n, y, x]] + unit64[levels[n, height - 1 - y, width - 1 - x]]
                for c in range(3):
                    value = unit32[images[n, y, x, c]]
                    value = keep * value + lift * max(value, floor)
                    total = np.float64(value) + snow
                    out[n, y, x, c] = np.uint8(min(max(total, 0.0), 1.0) * 255.0)


def snow(images: np.ndarray, params: Snow, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """Thresholded, zoomed Gaussian flakes, motion-blurred at U(-135, -45) deg, added twice (and rotated 180).

    cifar: the layer goes through ImageMagick as 8-bit grey (truncated in, rounded out) and is centre-trimmed;
    imagenet (the fork): float layer, zoomed without trimming, blurred, rounded, then cropped top-left.
    """
    count, height, width, _ = images.shape
    levels = np.empty((count, height, width), dtype=np.uint8)
    keep = "centre" if profile == "cifar" else "all"
    for n, rng in enumerate(rngs):
        flakes = normal_layer(rng, params.loc, params.scale, height, width)
        layer = clipped_zoom(flakes[None, :, :, None], float(params.zoom), keep)[0, :, :, 0]
        layer[layer < params.threshold] = 0
        angle = rng.uniform(-135, -45)
        if profile == "cifar":
            grey = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
            blurred = motion_blur_image(grey, params.blur_radius, params.blur_sigma, angle)
            levels[n] = np.floor(np.clip(blurred, 0, 255) + 0.5)
        else:
            flakes = np.clip(layer, 0, 1).astype(np.float32)  # blurred in float32 (the fork: float64)
            blurred = motion_blur_image(flakes, params.blur_radius, params.blur_sigma, angle)
            levels[n] = np.round(blurred * 255)[:height, :width]
    out = np.empty_like(images)
    _snow_composite_kernel(images, levels, float(params.blend), UNIT_FLOAT32, UNIT_FLOAT64, out)
    return out


# ---------------------------------------------------------------- frost


@lru_cache(maxsize=6)
def frost_texture(index: int) -> np.ndarray:
    """A frost texture as BGR uint8, read from the `imagecorruptions` package data (never copied here)."""
    resource = importlib.resources.files("imagecorruptions") / "frost" / FROST_TEXTURES[index]
    data = np.frombuffer(resource.read_bytes(), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


@lru_cache(maxsize=64)
def _frost_scaled(index: int, height: int, width: int, profile: str) -> np.ndarray:
    texture = frost_texture(index)
    if profile == "cifar":
        return cv2.resize(texture, (0, 0), fx=0.2, fy=0.2)
    # The fork: scale so the texture covers the image (the larger of the two ratios), times 1.1.
    texture_height, texture_width = texture.shape[:2]
    factor = 1.0
    if texture_height < height and texture_width >= width:
        factor = height / texture_height
    elif texture_height >= height and texture_width < width:
        factor = width / texture_width
    elif texture_height < height and texture_width < width:
        factor = max(height / texture_height, width / texture_width)
    factor *= 1.1
    size = (int(np.ceil(texture_width * factor)), int(np.ceil(texture_height * factor)))
    return cv2.resize(texture, dsize=size, interpolation=cv2.INTER_CUBIC)


def frost_textures(profile: str) -> int:
    """CIFAR-10-C draws from the first five textures only; the fork draws from all six."""
    return 5 if profile == "cifar" else 6


def frost(images: np.ndarray, params: Frost, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """image_weight * x + frost_weight * (random crop of a frost texture), in 0..255."""
    count, height, width, _ = images.shape
    if profile == "cifar":  # fixed-scale textures: the image must fit inside every one that can be drawn
        limit_height, limit_width = np.min([_frost_scaled(i, 0, 0, "cifar").shape[:2] for i in range(5)], axis=0)
        if height >= limit_height or width >= limit_width:
            raise CorruptionError(
                f"profile 'cifar' frost needs images smaller than {limit_height}x{limit_width} (its textures are "
                f"scaled by 0.2), got {height}x{width}; use profile='imagenet' for larger images"
            )
    crops = np.empty_like(images)
    for n, rng in enumerate(rngs):
        index = int(rng.integers(frost_textures(profile)))
        texture = _frost_scaled(index, height, width, profile)
        top = int(rng.integers(0, texture.shape[0] - height))
        left = int(rng.integers(0, texture.shape[1] - width))
        crops[n] = texture[top : top + height, left : left + width, ::-1]
    out = np.empty_like(images)
    _weighted_sum_kernel(images, crops, float(params.image_weight), float(params.frost_weight), out)
    return out


@jit
def _weighted_sum_kernel(images, overlays, image_weight, overlay_weight, out):  # pragma: no cover - compiled
    # clip(a * x + b * overlay, 0, 255) in float64 (0..255 units), truncated: the generators' frost blend.
    source = images.reshape(-1)
    layer = overlays.reshape(-1)
    target = out.reshape(-1)
    for i in range(source.size):
        value = image_weight * source[i] + overlay_weight * layer[i]
        target[i] = np.uint8(min(max(value, 0.0), 255.0))


# ---------------------------------------------------------------- fog


@jit
def _wibbled(total, wibble, rng):  # pragma: no cover - compiled
    return total / 4 + wibble * (-wibble + (2 * wibble) * rng.random())


@jit
def _plasma_kernel(rng, wibble_decay, out):  # pragma: no cover - compiled
    # Diamond-square on a periodic mapsize x mapsize grid; draws in the order of the generators' three
    # `np.random.uniform(-wibble, wibble, shape)` calls per level (C order within each call).
    mapsize = out.shape[0]
    out[0, 0] = 0.0
    step = mapsize
    wibble = 100.0
    while step >= 2:
        half = step // 2
        cells = mapsize // step
        for i in range(cells):  # squares: centre = mean of the 4 corners
            below = ((i + 1) % cells) * step
            for j in range(cells):
                right = ((j + 1) % cells) * step
                total = (out[i * step, j * step] + out[below, j * step]) + (out[i * step, right] + out[below, right])
                out[half + i * step, half + j * step] = _wibbled(total, wibble, rng)
        for i in range(cells):  # diamonds on the rows of corners
            above = ((i - 1) % cells) * step
            for j in range(cells):
                right = ((j + 1) % cells) * step
                total = (out[half + i * step, half + j * step] + out[half + above, half + j * step]) + (
                    out[i * step, j * step] + out[i * step, right]
                )
                out[i * step, half + j * step] = _wibbled(total, wibble, rng)
        for i in range(cells):  # diamonds on the columns of corners
            below = ((i + 1) % cells) * step
            for j in range(cells):
                left = ((j - 1) % cells) * step
                total = (out[half + i * step, half + j * step] + out[half + i * step, half + left]) + (
                    out[i * step, j * step] + out[below, j * step]
                )
                out[half + i * step, j * step] = _wibbled(total, wibble, rng)
        step //= 2
        wibble /= wibble_decay
    low = out.min()
    out -= low
    out /= out.max()


def plasma_fractal(rng: np.random.Generator, mapsize: int, wibble_decay: float) -> np.ndarray:
    """Diamond-square height map in [0, 1] (the generators' plasma_fractal, from FLHerne/mapgen).

    Corner 0, wibble 100 divided by the decay per level, each new point = mean / 4 + wibble * U(-wibble,
    wibble) -- the wibble enters twice, as in the original. mapsize must be a power of two.
    """
    out = np.empty((mapsize, mapsize), dtype=np.float64)
    _plasma_kernel(rng, float(wibble_decay), out)
    return out


def fog_mapsize(height: int, width: int) -> int:
    """The next power of two >= the longer side (32 for CIFAR, as the CIFAR-10-C generator fixes)."""
    side = max(height, width, 3)
    return 1 << (side - 1).bit_length()


def fog(images: np.ndarray, params: Fog, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """x += strength * plasma; x * max(x) / (max(x) + strength)."""
    count, height, width, _ = images.shape
    mapsize = fog_mapsize(height, width)
    out = np.empty_like(images)
    for n, rng in enumerate(rngs):
        plasma = plasma_fractal(rng, mapsize, params.wibble_decay)
        _fog_composite_kernel(images[n], plasma, float(params.strength), UNIT_FLOAT64, out[n])
    return out


@jit
def _fog_composite_kernel(image, plasma, strength, unit64, out):  # pragma: no cover - compiled
    # x = k / 255; x += strength * map; x * max(x) / (max(x) + strength); clip, truncate (float64).
    height, width, channels = image.shape
    brightest = 0
    for y in range(height):
        for x in range(width):
            for c in range(channels):
                brightest = max(brightest, image[y, x, c])
    peak = unit64[brightest]
    scale = peak + strength
    for y in range(height):
        for x in range(width):
            fog = strength * plasma[y, x]
            for c in range(channels):
                value = (unit64[image[y, x, c]] + fog) * peak / scale
                out[y, x, c] = np.uint8(min(max(value, 0.0), 1.0) * 255.0)


# ---------------------------------------------------------------- spatter

_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
_WATER = np.array([175, 238, 238], dtype=np.float32) / np.float32(255.0)
_MUD = np.array([63, 42, 20], dtype=np.float32) / np.float32(255.0)


def spatter(images: np.ndarray, params: Spatter, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """Water drops (Canny -> distance -> emboss, pale turquoise added) or mud (opaque brown blotches)."""
    count, height, width, _ = images.shape
    out = np.empty_like(images)
    for n, rng in enumerate(rngs):
        liquid = normal_layer(rng, params.loc, params.scale, height, width)
        liquid = gaussian_filter(liquid, params.sigma)
        liquid[liquid < params.threshold] = 0
        if params.mud:
            mask = gaussian_filter((liquid > params.threshold).astype(np.float32), params.intensity)
            mask[mask < 0.8] = 0
            _mud_kernel(images[n], mask, _MUD, out[n])
        else:
            _water_kernel(images[n], _water_mask(liquid, params.intensity), _WATER, out[n])
    return out


def _water_mask(liquid: np.ndarray, intensity: float) -> np.ndarray:
    # (liquid * 255).astype(uint8) wraps values above 1 modulo 256 on the generators' platforms; going through
    # int32 makes that explicit and portable.
    grey = (liquid * 255).astype(np.int32).astype(np.uint8)
    distance = 255 - cv2.Canny(grey, 50, 150)
    distance = cv2.distanceTransform(distance, cv2.DIST_L2, 5)
    _, distance = cv2.threshold(distance, 20, 20, cv2.THRESH_TRUNC)
    distance = cv2.blur(distance, (3, 3)).astype(np.uint8)
    distance = cv2.equalizeHist(distance)
    distance = cv2.filter2D(distance, cv2.CV_8U, _EMBOSS)
    distance = cv2.blur(distance, (3, 3)).astype(np.float32)
    mask = grey * distance
    peak = mask.max()
    if peak <= 0:  # no drop anywhere: the generators would divide 0 by 0 here
        return np.zeros_like(mask)
    return mask / peak * np.float32(intensity)


@jit
def _water_kernel(image, mask, colour, out):  # pragma: no cover - compiled
    # x + mask * colour in float32 (x = uint8 / 255), clip, truncate.
    height, width, channels = image.shape
    for y in range(height):
        for x in range(width):
            for c in range(channels):
                value = np.float32(image[y, x, c]) / np.float32(255.0) + mask[y, x] * colour[c]
                value = min(max(value, np.float32(0.0)), np.float32(1.0))
                out[y, x, c] = np.uint8(value * np.float32(255.0))


@jit
def _mud_kernel(image, mask, colour, out):  # pragma: no cover - compiled
    # x * (1 - mask) + colour * mask in float32, clip, truncate.
    height, width, channels = image.shape
    for y in range(height):
        for x in range(width):
            m = mask[y, x]
            for c in range(channels):
                value = np.float32(image[y, x, c]) / np.float32(255.0) * (np.float32(1.0) - m) + colour[c] * m
                value = min(max(value, np.float32(0.0)), np.float32(1.0))
                out[y, x, c] = np.uint8(value * np.float32(255.0))
