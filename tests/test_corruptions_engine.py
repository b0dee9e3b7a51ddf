"""The corruption engine's contract: shapes and dtype, determinism, batch independence, errors, the grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    DETERMINISTIC,
    ENGINE_VERSION,
    EXTRA_CORRUPTIONS,
    PROFILES,
    SEVERITIES,
    CorruptionError,
    corrupt,
    engine,
    engine_fingerprint,
    save_corruption_grid,
)

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)

RANDOM = [name for name in CORRUPTIONS if name not in DETERMINISTIC]
SIZES = {"cifar": (32, 32), "imagenet": (40, 56)}


def natural_like(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, a hard edge, texture and a saturated patch: every corruption has work to do."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    images = np.empty((count, height, width, 3), dtype=np.float64)
    for n in range(count):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        for c in range(3):
            images[n, :, :, c] = 0.5 + 0.35 * np.sin(3 * xs + 2 * ys * (c + 1) + phase[c])
        images[n, : height // 3, width // 2 :] = 0.97  # a bright, almost flat patch
        images[n, height // 2 :, : width // 4] *= 0.3  # a dark block with a hard edge
    images += rng.normal(0, 0.04, size=images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def batches() -> dict[str, np.ndarray]:
    return {profile: natural_like(4, *SIZES[profile], seed=1) for profile in PROFILES}


def test_public_constants() -> None:
    assert len(CORRUPTIONS) == 19 and len(set(CORRUPTIONS)) == 19
    assert CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert BENCHMARK_CORRUPTIONS == CORRUPTIONS[:15] and BENCHMARK_CORRUPTIONS[-1] == "jpeg_compression"
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert PROFILES == ("cifar", "imagenet") and SEVERITIES == (1, 2, 3, 4, 5)
    assert isinstance(ENGINE_VERSION, str) and ENGINE_VERSION
    assert engine_fingerprint().startswith(f"engine {ENGINE_VERSION}; numpy {np.__version__}")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_repeatability(batches: dict[str, np.ndarray], profile: str, name: str) -> None:
    images = batches[profile]
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, profile=profile, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        single = corrupt(images[1], name, severity, profile=profile, seed=3, index=1)
        assert single.shape == images[1].shape and single.dtype == np.uint8
        np.testing.assert_array_equal(single, out[1])  # a lone image with its index = its row in the batch
        np.testing.assert_array_equal(corrupt(images, name, severity, profile=profile, seed=3), out)
    assert not np.array_equal(out, images), f"{name} severity 5 left the images unchanged"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", RANDOM)
def test_other_seed_other_bytes(batches: dict[str, np.ndarray], profile: str, name: str) -> None:
    images = batches[profile]
    first = corrupt(images, name, 3, profile=profile, seed=0)
    assert not np.array_equal(first, corrupt(images, name, 3, profile=profile, seed=1))
    # Another index is another draw too (the seed sequence includes the dataset index).
    assert not np.array_equal(first, corrupt(images, name, 3, profile=profile, seed=0, index=100))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", RANDOM)
def test_batch_split_order_and_chunking_do_not_matter(
    batches: dict[str, np.ndarray], profile: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = batches[profile]
    whole = corrupt(images, name, 4, profile=profile, seed=7, index=20)
    one_by_one = np.stack(
        [corrupt(image, name, 4, profile=profile, seed=7, index=20 + i) for i, image in enumerate(images)]
    )
    np.testing.assert_array_equal(whole, one_by_one)
    chunks = np.concatenate(
        [
            corrupt(images[:1], name, 4, profile=profile, seed=7, index=20),
            corrupt(images[1:], name, 4, profile=profile, seed=7, index=21),
        ]
    )
    np.testing.assert_array_equal(whole, chunks)
    order = np.array([3, 0, 2, 1])
    shuffled = corrupt(images[order], name, 4, profile=profile, seed=7, index=20 + order)
    np.testing.assert_array_equal(shuffled, whole[order])
    monkeypatch.setattr(engine, "_CHUNK_ELEMENTS", 1)  # one image per internal chunk
    np.testing.assert_array_equal(corrupt(images, name, 4, profile=profile, seed=7, index=20), whole)


@pytest.mark.parametrize("profile", PROFILES)
def test_global_random_state_neither_used_nor_changed(batches: dict[str, np.ndarray], profile: str) -> None:
    images = batches[profile]
    np.random.seed(1)  # noqa: NPY002 - the legacy global state is what must stay untouched
    before = np.random.get_state(legacy=False)  # noqa: NPY002
    first = [corrupt(images, name, 2, profile=profile) for name in RANDOM]
    after = np.random.get_state(legacy=False)  # noqa: NPY002
    assert before["state"]["pos"] == after["state"]["pos"]
    np.testing.assert_array_equal(before["state"]["key"], after["state"]["key"])
    np.random.seed(2)  # noqa: NPY002
    second = [corrupt(images, name, 2, profile=profile) for name in RANDOM]
    for name, a, b in zip(RANDOM, first, second, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_non_contiguous_input_and_integer_types(batches: dict[str, np.ndarray]) -> None:
    images = batches["cifar"]
    flipped = images[:, ::-1]
    expected = corrupt(np.ascontiguousarray(flipped), "snow", 2, seed=np.int64(5), index=np.int32(3))
    np.testing.assert_array_equal(corrupt(flipped, "snow", np.int64(2), seed=5, index=3), expected)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"name": "gaussian"}, "unknown corruption 'gaussian'; use one of: gaussian_noise"),
        ({"severity": 0}, "severity must be an integer from 1 to 5"),
        ({"severity": 6}, "severity must be an integer from 1 to 5"),
        ({"severity": 2.0}, "severity must be an integer from 1 to 5"),
        ({"severity": True}, "severity must be an integer from 1 to 5"),
        ({"profile": "tiny"}, "unknown profile 'tiny'"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"index": [0, 1]}, "index must be an int or 3 integers"),
        ({"index": -2}, "index must be >= 0"),
    ],
)
def test_bad_arguments_raise_one_line(arguments: dict, fragment: str) -> None:
    images = natural_like(3, 32, 32)
    call = {"name": "contrast", "severity": 1, "profile": "cifar", "seed": 0, "index": 0} | arguments
    with pytest.raises(CorruptionError) as caught:
        corrupt(images, call.pop("name"), call.pop("severity"), **call)
    message = str(caught.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    ("images", "fragment"),
    [
        (np.zeros((32, 32, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((32, 32, 2), dtype=np.uint8), "HxWx3 or NxHxWx3"),
        (np.zeros((32, 32), dtype=np.uint8), "HxWx3 or NxHxWx3"),
        (np.zeros((1, 1, 32, 32, 3), dtype=np.uint8), "HxWx3 or NxHxWx3"),
        (np.zeros((0, 32, 3), dtype=np.uint8), "at least one pixel"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images_raise_one_line(images: object, fragment: str) -> None:
    with pytest.raises(CorruptionError) as caught:
        corrupt(images, "gaussian_noise", 1)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_cifar_frost_refuses_images_larger_than_its_textures() -> None:
    corrupt(np.zeros((62, 104, 3), dtype=np.uint8), "frost", 1, profile="cifar")  # fits every texture
    for shape in [(63, 50, 3), (50, 105, 3)]:  # whatever the draw: checked against all five textures
        with pytest.raises(CorruptionError, match="use profile='imagenet'"):
            corrupt(np.zeros(shape, dtype=np.uint8), "frost", 1, profile="cifar")


def test_empty_batch() -> None:
    out = corrupt(np.zeros((0, 32, 32, 3), dtype=np.uint8), "snow", 1)
    assert out.shape == (0, 32, 32, 3)


def test_save_corruption_grid(tmp_path) -> None:
    image = natural_like(1, 32, 32)[0]
    target = save_corruption_grid(image, tmp_path / "grids" / "cifar.png", profile="cifar", seed=1)
    assert target == tmp_path / "grids" / "cifar.png"
    with Image.open(target) as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 1000
    assert [p.name for p in target.parent.iterdir()] == ["cifar.png"]  # no temporary file left behind
    with pytest.raises(CorruptionError):
        save_corruption_grid(natural_like(2, 32, 32), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
