"""Validation, dispatch and the per-image random generators: the determinism contract lives here.

Image i's output depends only on (profile, seed, its dataset index, corruption, severity, its pixels): each
random corruption gets one `numpy.random.Generator` per image, seeded from exactly those numbers, and no
function here or below touches numpy's global random state. Batches are processed in chunks whose size
never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from datamodules.corruptions import blur, digital, noise, weather
from datamodules.corruptions._common import CorruptionError
from datamodules.corruptions.profiles import PROFILES, parameters
from records.splits import CORRUPTIONS, SEVERITIES

# Bump whenever the bytes an input produces change (caches of generated splits key on it).
ENGINE_VERSION = "1"

# The names and their order are the splits' vocabulary (records.splits); the functions are here.

CorruptionFunction = Callable[[np.ndarray, Any, Sequence[np.random.Generator] | None, str], np.ndarray]

_FUNCTIONS: dict[str, CorruptionFunction] = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": digital.brightness,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    "speckle_noise": noise.speckle_noise,
    "gaussian_blur": blur.gaussian_blur,
    "spatter": weather.spatter,
    "saturate": digital.saturate,
}

# Corruptions that draw no random numbers: no generators are built for them.
DETERMINISTIC: frozenset[str] = frozenset(
    {
        "defocus_blur",
        "zoom_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
        "gaussian_blur",
        "saturate",
    }
)

# Images per chunk scale with image size, so memory stays bounded (about 4 M elements of uint8 input).
_CHUNK_ELEMENTS = 1 << 22


def corrupt(
    images: np.ndarray,
    name: str,
    severity: int,
    profile: str = "cifar",
    seed: int = 0,
    index: int | Sequence[int] | np.ndarray = 0,
) -> np.ndarray:
    """Corrupt a uint8 RGB image (HxWx3) or batch (NxHxWx3); returns the same shape, uint8.

    `index` is the dataset index of the first image (the batch gets index, index + 1, ...) or one integer
    per image. The output for each image depends only on (profile, seed, its index, name, severity, pixels).
    """
    number = _check_name(name)
    _check_severity(severity)
    profile_number = _check_profile(profile)
    batch = _check_images(images)
    count, height, width, _ = batch.shape
    indices = _check_indices(index, count)
    seed = _check_seed(seed)
    function = _FUNCTIONS[name]
    table_row = parameters(profile, name, int(severity))
    out = np.empty_like(batch)
    chunk = max(1, _CHUNK_ELEMENTS // (height * width * 3))
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        rngs = None
        if name not in DETERMINISTIC:
            rngs = [image_generator(seed, int(i), number, int(severity), profile_number) for i in indices[start:stop]]
        chunk_images = batch[start:stop]
        if not (chunk_images.flags.c_contiguous and chunk_images.flags.writeable):
            # One array type for the compiled kernels (read-only arrays, e.g. from PIL or a memory map, would
            # each need their own compilation).
            chunk_images = chunk_images.copy()
        out[start:stop] = function(chunk_images, table_row, rngs, profile)
    return out[0] if images.ndim == 3 else out


def engine_fingerprint() -> str:
    """ENGINE_VERSION plus the library versions the bytes also depend on (random algorithms, codecs, filters).

    For cache manifests: a generated split is only reusable where all of these match.
    """
    import cv2
    import numba
    import PIL

    versions = {"engine": ENGINE_VERSION, "numpy": np.__version__, "numba": numba.__version__}
    versions |= {"opencv": cv2.__version__, "pillow": PIL.__version__}
    return "; ".join(f"{name} {version}" for name, version in versions.items())


def image_generator(seed: int, index: int, corruption: int, severity: int, profile: int) -> np.random.Generator:
    """The one Generator an image's corruption draws from; a function of these five numbers only."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, corruption, severity, profile]))


def _check_name(name: object) -> int:
    if not isinstance(name, str) or name not in _FUNCTIONS:
        raise CorruptionError(f"unknown corruption {name!r}; use one of: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS.index(name)


def _check_severity(severity: object) -> None:
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise CorruptionError(f"severity must be an integer from 1 to 5, got {severity!r}")


def _check_profile(profile: object) -> int:
    if not isinstance(profile, str) or profile not in PROFILES:
        raise CorruptionError(f"unknown profile {profile!r}; use 'cifar' (32x32 tables) or 'imagenet' (any size)")
    return PROFILES.index(profile)


def _check_images(images: object) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise CorruptionError(f"images must be a numpy array, got {type(images).__name__}; wrap it in np.asarray")
    if images.dtype != np.uint8:
        raise CorruptionError(
            f"images must be uint8 in 0..255, got {images.dtype}; convert with (x * 255).round().astype(np.uint8)"
        )
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise CorruptionError(f"images must be HxWx3 or NxHxWx3 RGB, got shape {images.shape}")
    batch = images[None] if images.ndim == 3 else images
    if min(batch.shape[1:3]) < 1:
        raise CorruptionError(f"images must have at least one pixel, got shape {images.shape}")
    return batch


def _check_indices(index: object, count: int) -> np.ndarray:
    if isinstance(index, int | np.integer) and not isinstance(index, bool):
        if index < 0:
            raise CorruptionError(f"index must be >= 0, got {index}")
        return np.arange(int(index), int(index) + count, dtype=np.int64)
    indices = np.asarray(index)
    if indices.ndim != 1 or len(indices) != count or not np.issubdtype(indices.dtype, np.integer):
        raise CorruptionError(f"index must be an int or {count} integers (one per image), got {index!r}")
    if count and indices.min() < 0:
        raise CorruptionError("index values must be >= 0")
    return indices.astype(np.int64)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CorruptionError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
