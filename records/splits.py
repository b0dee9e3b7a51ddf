"""The names of a test set's splits, one vocabulary for the DataModules, the task modules, the store and the report.

A test split is 'clean' or '<corruption>/<severity>'; measures on training images use the split 'train'. A
results row spells the same identity as (split, corruption, severity) columns: ('test', 'clean', 0),
('test', 'fog', 3), ('train', 'none', 0).
"""

from __future__ import annotations

CLEAN = "clean"
TRAIN = "train"

# The 19 corruptions of Hendrycks & Dietterich (2019): the 15 benchmark ones (ImageNet-C's, and the mPC of
# Michaelis et al. 2019), then the 4 extra ones (held out for validation in the original benchmark). The engine
# implements them in this order.
BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",  # noise
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",  # blur
    "snow", "frost", "fog", "brightness",  # weather
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",  # digital
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def split_name(corruption: str, severity: int) -> str:
    """('fog', 3) -> 'fog/3'; ('clean', 0) -> 'clean'."""
    return CLEAN if corruption == CLEAN else f"{corruption}/{severity}"


def split_columns(name: str) -> dict[str, str | int]:
    """The split, corruption and severity columns of a results row measured on split `name`."""
    return dict(zip(("split", "corruption", "severity"), split_identity(name), strict=True))


def split_identity(name: str) -> tuple[str, str, int]:
    """'clean' -> ('test', 'clean', 0); 'gaussian_noise/3' -> ('test', 'gaussian_noise', 3);
    'train' (measures on training images) -> ('train', 'none', 0)."""
    if name == TRAIN:
        return TRAIN, "none", 0
    corruption, _, severity = name.partition("/")
    return "test", corruption, int(severity) if severity else 0


def corruption_of(name: str) -> str:
    """'fog/3' -> 'fog'; 'clean' -> 'clean'."""
    return name.partition("/")[0]


def severity_of(name: str) -> int:
    """'fog/3' -> 3; 'clean' -> 0."""
    return split_identity(name)[2]
