"""The `imagenet` profile against the maintained `imagecorruptions` fork on real Pascal VOC images.

Deterministic corruptions must agree within one intensity level on average (and pixel by pixel). Where the fork
draws only uniform doubles (motion blur's angle, elastic's fields, fog's plasma) its global RandomState is put
into the same MT19937 state as our Generator, so both consume identical streams and must agree like the
deterministic ones; frost's three integer draws are replayed. The other random corruptions draw Gaussian,
Poisson or numba-internal numbers that cannot be matched, so their output statistics are compared across
repeated draws, with tolerances from the draw-to-draw spread. Needs ../shared/data; skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.corruptions import DETERMINISTIC, SEVERITIES, blur, corrupt, digital, weather
from datamodules.corruptions.profiles import parameters

imagecorruptions = pytest.importorskip("imagecorruptions")

VOC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "voc2007-dev" / "VOCdevkit" / "VOC2007"
pytestmark = [
    pytest.mark.skipif(not (VOC / "JPEGImages").is_dir(), reason="needs ../shared/data/voc2007-dev"),
    pytest.mark.unit,
]

MATCHED = {"motion_blur": blur.motion_blur, "elastic_transform": digital.elastic_transform, "fog": weather.fog}
STATISTICAL = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "snow", "spatter"]


def voc_images(count: int, crop: bool) -> list[np.ndarray]:
    """Real VOC images; `crop` takes a 150x200 / 200x150 centre window so the slow fork stays fast."""
    paths = sorted((VOC / "JPEGImages").glob("*.jpg"))[: count * 7 : 7]
    images = []
    for n, path in enumerate(paths):
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if crop:
            height, width = (150, 200) if n % 2 == 0 else (200, 150)
            top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
            array = np.ascontiguousarray(array[top : top + height, left : left + width])
        images.append(array)
    return images


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return voc_images(3, crop=True)


def fork(image: np.ndarray, name: str, severity: int, seed: int | None = None) -> np.ndarray:
    extra = {"seed": seed} if name in ("glass_blur", "impulse_noise") and seed is not None else {}
    return imagecorruptions.corrupt(image, corruption_name=name, severity=severity, **extra)


def matched_generators(seed: int) -> np.random.Generator:
    """Put numpy's global RandomState in the state of a fresh MT19937 Generator (same doubles from both)."""
    state = np.random.MT19937(seed).state["state"]
    np.random.set_state(("MT19937", state["key"], state["pos"]))  # noqa: NPY002 - the fork's global stream
    return np.random.Generator(np.random.MT19937(seed))


@pytest.fixture(autouse=True)
def restore_global_random_state():
    saved = np.random.get_state()  # noqa: NPY002
    yield
    np.random.set_state(saved)  # noqa: NPY002


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_corruptions_match_the_fork(images: list[np.ndarray], name: str) -> None:
    for severity in SEVERITIES:
        for image in images:
            difference = np.abs(
                corrupt(image, name, severity, profile="imagenet").astype(int) - fork(image, name, severity)
            )
            assert difference.mean() <= 1.0 and difference.max() <= 1, (severity, difference.mean(), difference.max())


@pytest.mark.parametrize("name", sorted(MATCHED))
def test_uniform_draw_corruptions_match_the_fork_draw_for_draw(images: list[np.ndarray], name: str) -> None:
    for severity in SEVERITIES:
        for n, image in enumerate(images):
            rng = matched_generators(100 * severity + n)
            expected = fork(image, name, severity)
            ours = MATCHED[name](image[None], parameters("imagenet", name, severity), [rng], "imagenet")[0]
            difference = np.abs(ours.astype(int) - expected)
            assert difference.mean() <= 0.1 and difference.max() <= 1, (severity, difference.mean(), difference.max())


class ReplayedIntegers:
    """Stands in for a Generator whose `integers` calls return the fork's legacy randint draws."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)

    def integers(self, *args, **kwargs) -> int:
        return self.values.pop(0)


def test_frost_matches_the_fork_with_its_draws_replayed(images: list[np.ndarray]) -> None:
    for severity in SEVERITIES:
        for n, image in enumerate(images):
            np.random.seed(severity * 10 + n)  # noqa: NPY002
            expected = fork(image, "frost", severity)
            np.random.seed(severity * 10 + n)  # noqa: NPY002
            index = np.random.randint(6)  # noqa: NPY002
            texture = weather._frost_scaled(index, image.shape[0], image.shape[1], "imagenet")
            top = np.random.randint(0, texture.shape[0] - image.shape[0])  # noqa: NPY002
            left = np.random.randint(0, texture.shape[1] - image.shape[1])  # noqa: NPY002
            replay = ReplayedIntegers([index, top, left])
            ours = weather.frost(image[None], parameters("imagenet", "frost", severity), [replay], "imagenet")[0]
            np.testing.assert_array_equal(ours, expected)


def draw_statistics(outputs: list[np.ndarray], image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per draw: mean and std of (output - input), mean |output - input|, the output's mean per channel.

    Also each statistic's sampling error were all pixels independent (std / sqrt(count)): a floor for the
    draw-to-draw spread, which a handful of draws estimates poorly.
    """
    rows, floors = [], []
    pixels = image.shape[0] * image.shape[1]
    for out in outputs:
        difference = out.astype(np.float64) - image
        spread = difference.std()
        rows.append([difference.mean(), spread, np.abs(difference).mean(), *out.mean(axis=(0, 1))])
        elements = np.sqrt(3 * pixels)
        floors.append(
            [
                spread / elements,
                spread / np.sqrt(2) / elements,
                spread / elements,
                *(out.std(axis=(0, 1)) / np.sqrt(pixels)),
            ]
        )
    return np.array(rows), np.array(floors)


def compare_draws(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray], label: str) -> None:
    """Each statistic's mean over draws agrees within 5 standard errors of the difference (+ 0.05 levels)."""
    (a, floor_a), (b, floor_b) = ours, theirs
    variance_a = np.maximum(a.var(axis=0, ddof=1), (floor_a**2).mean(axis=0))
    variance_b = np.maximum(b.var(axis=0, ddof=1), (floor_b**2).mean(axis=0))
    allowed = 5 * np.sqrt(variance_a / len(a) + variance_b / len(b)) + 0.05
    gap = np.abs(a.mean(axis=0) - b.mean(axis=0))
    assert np.all(gap <= allowed), f"{label}: gap {gap.round(3)} allowed {allowed.round(3)}"


@pytest.mark.parametrize("name", STATISTICAL)
def test_random_corruptions_match_the_fork_statistically(images: list[np.ndarray], name: str) -> None:
    draws = 6 if name in ("snow", "spatter") else 3
    image = images[0]
    for severity in SEVERITIES:
        ours = [corrupt(image, name, severity, profile="imagenet", seed=seed) for seed in range(draws)]
        theirs = []
        for seed in range(draws):
            np.random.seed(seed)  # noqa: NPY002
            theirs.append(fork(image, name, severity, seed=seed))
        compare_draws(draw_statistics(ours, image), draw_statistics(theirs, image), f"{name} severity {severity}")


@pytest.mark.slow
@pytest.mark.parametrize("name", STATISTICAL + sorted(DETERMINISTIC) + sorted(MATCHED))
def test_full_size_sweep(name: str) -> None:
    """Full-size VOC images, more draws: the same checks at the resolution the detection benchmark uses."""
    for image in voc_images(4, crop=False):
        for severity in SEVERITIES:
            if name in DETERMINISTIC:
                difference = np.abs(
                    corrupt(image, name, severity, profile="imagenet").astype(int) - fork(image, name, severity)
                )
                assert difference.mean() <= 1.0 and difference.max() <= 1
            elif name in MATCHED:
                rng = matched_generators(severity)
                expected = fork(image, name, severity)
                ours = MATCHED[name](image[None], parameters("imagenet", name, severity), [rng], "imagenet")[0]
                assert np.abs(ours.astype(int) - expected).max() <= 1
            else:
                ours = [corrupt(image, name, severity, profile="imagenet", seed=seed) for seed in range(8)]
                theirs = []
                for seed in range(8):
                    np.random.seed(seed)  # noqa: NPY002
                    theirs.append(fork(image, name, severity, seed=seed))
                compare_draws(draw_statistics(ours, image), draw_statistics(theirs, image), f"{name} {severity}")
