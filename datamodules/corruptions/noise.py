"""Gaussian, shot, impulse and speckle noise: one compiled pass per image, drawing from its own Generator.

Each image's noise comes from its own `numpy.random.Generator` (passed into the numba kernel), drawn in C
order of the HxWx3 array as `Generator.normal(size=x.shape)` would: results depend on the image's seed only.
Arithmetic follows the generators: x = k / 255 in float64, clip to [0, 1], multiply by 255, truncate.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, xlogy

from datamodules.corruptions._common import UNIT_FLOAT64, jit


@jit
def _gaussian_kernel(pixels, std, rng, out):  # pragma: no cover - compiled
    for i in range(pixels.size):
        value = UNIT_FLOAT64[pixels[i]] + std * rng.standard_normal()
        out[i] = np.uint8(min(max(value, 0.0), 1.0) * 255.0)


@jit
def _speckle_kernel(pixels, std, rng, out):  # pragma: no cover - compiled
    for i in range(pixels.size):
        x = UNIT_FLOAT64[pixels[i]]
        value = x + x * (std * rng.standard_normal())
        out[i] = np.uint8(min(max(value, 0.0), 1.0) * 255.0)


@jit
def _impulse_kernel(pixels, amount, rng, out):  # pragma: no cover - compiled
    # One uniform per element: below amount/2 -> pepper, below amount -> salt (salt:pepper 1:1, flip rate
    # amount), the same joint distribution as skimage's two Bernoulli draws.
    half = amount / 2.0
    for i in range(pixels.size):
        u = rng.random()
        if u < half:
            out[i] = 0
        elif u < amount:
            out[i] = 255
        else:
            out[i] = pixels[i]


@jit
def _poisson_inversion_kernel(pixels, cdf, guide, value_of_count, rng, out):  # pragma: no cover - compiled
    bins = guide.shape[1]
    for i in range(pixels.size):
        k = pixels[i]
        u = rng.random()
        count = guide[k, int(u * bins)]
        while cdf[k, count] <= u:
            count += 1
        out[i] = value_of_count[count]


def gaussian_noise(images: np.ndarray, std: float, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """x + N(0, std)."""
    return _per_image(_gaussian_kernel, images, float(std), rngs)


def speckle_noise(images: np.ndarray, std: float, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """x + x * N(0, std): noise proportional to intensity."""
    return _per_image(_speckle_kernel, images, float(std), rngs)


def impulse_noise(images: np.ndarray, amount: float, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """Salt and pepper on each array element independently (channels separately), as skimage's 's&p'."""
    return _per_image(_impulse_kernel, images, float(amount), rngs)


def shot_noise(images: np.ndarray, photons: float, rngs: Sequence[np.random.Generator], profile: str) -> np.ndarray:
    """Poisson(x * c) / c, sampled by exact inversion of per-intensity Poisson CDFs.

    x takes only 256 values, so each intensity's CDF is tabulated once per c; inversion with a guide table
    costs one uniform and ~1 comparison per element (numpy's Poisson sampler is ~8x slower here). The
    distribution is Poisson to float64 CDF precision (tail mass below 1e-16 is cut).
    """
    cdf, guide, value_of_count = _poisson_tables(float(photons))
    out = np.empty_like(images)
    for image, target, rng in zip(images, out, rngs, strict=True):
        _poisson_inversion_kernel(image.reshape(-1), cdf, guide, value_of_count, rng, target.reshape(-1))
    return out


def _per_image(kernel, images: np.ndarray, parameter: float, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    out = np.empty_like(images)
    for image, target, rng in zip(images, out, rngs, strict=True):
        kernel(image.reshape(-1), parameter, rng, target.reshape(-1))
    return out


@lru_cache(maxsize=16)
def _poisson_tables(photons: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CDF rows for lambda = (k / 255) * c, k = 0..255, a guide table, and the uint8 value of each count."""
    lambdas = (np.arange(256) / 255.0) * photons
    largest = int(np.ceil(photons + 14.0 * np.sqrt(photons) + 30.0))
    counts = np.arange(largest + 1, dtype=np.float64)
    log_pmf = xlogy(counts[None, :], lambdas[:, None]) - lambdas[:, None] - gammaln(counts + 1.0)[None, :]
    cdf = np.cumsum(np.exp(log_pmf), axis=1)
    cdf[:, -1] = 2.0  # sentinel: every u < 1 stops here, the (< 1e-16) tail beyond is folded into it
    bins = 2 * (largest + 1)
    thresholds = np.arange(bins) / bins
    guide = np.empty((256, bins), dtype=np.int64)
    for k in range(256):
        guide[k] = np.searchsorted(cdf[k], thresholds, side="right")
    value_of_count = (np.clip(counts / photons, 0.0, 1.0) * 255).astype(np.uint8)
    return cdf, guide, value_of_count
