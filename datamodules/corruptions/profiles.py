"""The parameter tables of both profiles, in one place, indexed [corruption][severity - 1].

`cifar` holds the values of the CIFAR-10-C generator (make_cifar_c.py, 32x32); `imagenet` the ImageNet-C
magnitudes as the maintained `imagecorruptions` fork generalises them to any image size. Values are written
as the generators compute them (e.g. `32 * 0.05`), so the floats are bit-identical to theirs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

PROFILES: tuple[str, ...] = ("cifar", "imagenet")


class GlassBlur(NamedTuple):
    sigma: float
    max_delta: int
    iterations: int


class DefocusBlur(NamedTuple):
    radius: float
    alias_blur: float


class MotionBlur(NamedTuple):
    radius: float
    sigma: float


class ZoomBlur(NamedTuple):
    """Zoom factors are `np.arange(start, stop, step)`, evaluated exactly as the generators do."""

    start: float
    stop: float
    step: float


class Snow(NamedTuple):
    loc: float
    scale: float
    zoom: float
    threshold: float
    blur_radius: float
    blur_sigma: float
    blend: float


class Frost(NamedTuple):
    image_weight: float
    frost_weight: float


class Fog(NamedTuple):
    strength: float
    wibble_decay: float


class Saturate(NamedTuple):
    multiply: float
    add: float


class Elastic(NamedTuple):
    """CIFAR-10-C: displacement scale, field smoothing sigma and affine jitter, all in pixels."""

    alpha: float
    sigma: float
    affine: float


class ElasticSized(NamedTuple):
    """The fork: alpha in pixels; smoothing sigma (per axis) and displacement bound as fractions of the size.

    The bound uses the image height for both axes, as the fork does.
    """

    alpha: float
    sigma_fraction: float
    bound_fraction: float


class Spatter(NamedTuple):
    loc: float
    scale: float
    sigma: float
    threshold: float
    intensity: float
    mud: bool


_CIFAR_SIZE = 32

CIFAR: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": tuple(DefocusBlur(*p) for p in ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    "glass_blur": tuple(GlassBlur(*p) for p in ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))),
    "motion_blur": tuple(MotionBlur(*p) for p in ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
    "zoom_blur": tuple(ZoomBlur(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": tuple(
        Snow(*p)
        for p in (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        )
    ),
    "frost": tuple(Frost(*p) for p in ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))),
    "fog": tuple(Fog(*p) for p in ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": tuple(
        Elastic(_CIFAR_SIZE * a, _CIFAR_SIZE * s, _CIFAR_SIZE * f)
        for a, s, f in (
            (0, 0, 0.08),
            (0.05, 0.2, 0.07),
            (0.08, 0.06, 0.06),
            (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03),
        )
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "spatter": tuple(
        Spatter(*p)
        for p in (
            (0.62, 0.1, 0.7, 0.7, 0.5, False),
            (0.65, 0.1, 0.8, 0.7, 0.5, False),
            (0.65, 0.3, 1, 0.69, 0.5, False),
            (0.65, 0.1, 0.7, 0.69, 0.6, True),
            (0.65, 0.1, 0.5, 0.68, 0.6, True),
        )
    ),
    "saturate": tuple(Saturate(*p) for p in ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))),
}

IMAGENET: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": tuple(DefocusBlur(*p) for p in ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "glass_blur": tuple(GlassBlur(*p) for p in ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))),
    "motion_blur": tuple(MotionBlur(*p) for p in ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
    "zoom_blur": tuple(
        ZoomBlur(*p) for p in ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))
    ),
    "snow": tuple(
        Snow(*p)
        for p in (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        )
    ),
    "frost": tuple(Frost(*p) for p in ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))),
    "fog": tuple(Fog(*p) for p in ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "elastic_transform": tuple(ElasticSized(250 * a, 0.01, 0.005) for a in (0.05, 0.065, 0.085, 0.1, 0.12)),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "spatter": tuple(
        Spatter(*p)
        for p in (
            (0.65, 0.3, 4, 0.69, 0.6, False),
            (0.65, 0.3, 3, 0.68, 0.6, False),
            (0.65, 0.3, 2, 0.68, 0.5, False),
            (0.65, 0.3, 1, 0.65, 1.5, True),
            (0.67, 0.4, 1, 0.65, 1.5, True),
        )
    ),
    "saturate": tuple(Saturate(*p) for p in ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))),
}

TABLES: dict[str, dict[str, tuple[Any, ...]]] = {"cifar": CIFAR, "imagenet": IMAGENET}


def parameters(profile: str, name: str, severity: int) -> Any:
    """One row of a table; the engine validates the arguments before calling this."""
    return TABLES[profile][name][severity - 1]
