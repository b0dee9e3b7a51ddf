"""The 19 corruptions x 5 severities of Hendrycks & Dietterich (2019) in two parameter profiles.

`cifar` reproduces the CIFAR-10-C generator's 32x32 tables and quirks; `imagenet` the ImageNet-C tables as the
`imagecorruptions` fork generalises them to any image size. Deterministic per (profile, seed, dataset index,
corruption, severity); see docs/corruptions.md.
"""

from datamodules.corruptions._common import CorruptionError
from datamodules.corruptions.engine import DETERMINISTIC, ENGINE_VERSION, corrupt, engine_fingerprint
from datamodules.corruptions.grid import save_corruption_grid
from datamodules.corruptions.profiles import PROFILES
from records.splits import BENCHMARK_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTIONS",
    "DETERMINISTIC",
    "ENGINE_VERSION",
    "EXTRA_CORRUPTIONS",
    "PROFILES",
    "SEVERITIES",
    "CorruptionError",
    "corrupt",
    "engine_fingerprint",
    "save_corruption_grid",
]
