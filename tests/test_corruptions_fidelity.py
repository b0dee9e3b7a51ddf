"""Each corruption against an independent computation of its formula or the distribution its parameters imply.

Deterministic corruptions are recomputed here from their definitions (skimage HSV, scipy filters and zoom,
Pillow) and must agree within one intensity level (the generators truncate float results; float32 vs float64
rounding can move a value across an integer). Random ones are checked through statistics whose tolerances
come from the sample sizes, or through exact replays of their random draws.
"""

from __future__ import annotations

import importlib.resources
import io

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats
from skimage.color import hsv2rgb, rgb2hsv

from datamodules.corruptions import PROFILES, SEVERITIES, blur, corrupt, digital, noise, weather
from datamodules.corruptions.profiles import TABLES, parameters

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)

TOLERANCE = 1  # intensity levels, for the deterministic corruptions


def natural_like(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    images = np.empty((count, height, width, 3))
    for n in range(count):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        for c in range(3):
            images[n, :, :, c] = 0.5 + 0.4 * np.sin(4 * xs + 3 * ys * (c + 1) + phase[c])
        images[n, : height // 3, width // 2 :] = 1.0  # saturated patch: exercises clipping
        images[n, height // 2 :, : width // 4] *= 0.25  # dark block, hard edge
    images += rng.normal(0, 0.05, size=images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


IMAGES = {"cifar": natural_like(3, 32, 32, seed=2), "imagenet": natural_like(2, 45, 61, seed=3)}


def grey(value: int, size: int = 96, count: int = 2) -> np.ndarray:
    return np.full((count, size, size, 3), value, dtype=np.uint8)


def assert_close(ours: np.ndarray, expected: np.ndarray, tolerance: int = TOLERANCE) -> None:
    difference = np.abs(ours.astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= tolerance, f"max |diff| {difference.max()}, mean {difference.mean():.4f}"


def truncate(values: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(values, 0, 1) * 255)


# ------------------------------------------------------------------ deterministic corruptions


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_saturate_contrast(profile: str, severity: int) -> None:
    images = IMAGES[profile]
    shift = parameters(profile, "brightness", severity)
    multiply, add = parameters(profile, "saturate", severity)
    factor = parameters(profile, "contrast", severity)
    for image, bright, saturated, contrasted in zip(
        images,
        corrupt(images, "brightness", severity, profile=profile),
        corrupt(images, "saturate", severity, profile=profile),
        corrupt(images, "contrast", severity, profile=profile),
        strict=True,
    ):
        x = image / 255.0
        hsv = rgb2hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        assert_close(bright, truncate(hsv2rgb(hsv)))
        hsv = rgb2hsv(x)
        hsv[..., 1] = np.clip(hsv[..., 1] * multiply + add, 0, 1)
        assert_close(saturated, truncate(hsv2rgb(hsv)))
        means = x.mean(axis=(0, 1), keepdims=True)
        assert_close(contrasted, truncate((x - means) * factor + means))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_and_jpeg_match_pillow_exactly(profile: str, severity: int) -> None:
    images = IMAGES[profile]
    fraction = parameters(profile, "pixelate", severity)
    quality = parameters(profile, "jpeg_compression", severity)
    up = Image.Resampling.BOX if profile == "cifar" else Image.Resampling.NEAREST
    for image, pixelated, compressed in zip(
        images,
        corrupt(images, "pixelate", severity, profile=profile),
        corrupt(images, "jpeg_compression", severity, profile=profile),
        strict=True,
    ):
        height, width = image.shape[:2]
        small = Image.fromarray(image).resize((int(width * fraction), int(height * fraction)), Image.Resampling.BOX)
        np.testing.assert_array_equal(pixelated, np.asarray(small.resize((width, height), up)))
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        np.testing.assert_array_equal(compressed, np.asarray(Image.open(buffer)))


def reference_disk(radius: float, alias_blur: float) -> np.ndarray:
    """The generators' anti-aliased disk kernel, built directly."""
    grid = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xs, ys = np.meshgrid(grid, grid)
    disk = ((xs**2 + ys**2) <= radius**2).astype(np.float32)
    disk /= disk.sum()
    return cv2.GaussianBlur(disk, (3, 3) if radius <= 8 else (5, 5), sigmaX=alias_blur).astype(np.float64)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_defocus_and_gaussian_blur(profile: str, severity: int) -> None:
    images = IMAGES[profile]
    radius, alias_blur = parameters(profile, "defocus_blur", severity)
    kernel = reference_disk(radius, alias_blur)
    sigma = parameters(profile, "gaussian_blur", severity)
    defocused = corrupt(images, "defocus_blur", severity, profile=profile)
    blurred = corrupt(images, "gaussian_blur", severity, profile=profile)
    for image, ours_defocus, ours_blur in zip(images, defocused, blurred, strict=True):
        x = image / 255.0
        expected = np.stack([ndimage.correlate(x[..., c], kernel, mode="mirror") for c in range(3)], axis=-1)
        assert_close(ours_defocus, truncate(expected))
        expected = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)
        assert_close(ours_blur, truncate(expected))


def reference_zoom_blur(image: np.ndarray, factors: np.ndarray, profile: str) -> np.ndarray:
    """clipped_zoom as CIFAR-10-C (centre crop, centre trim) or the fork (centre crop, top-left [:h, :w])."""
    x = (image / 255.0).astype(np.float32)
    height, width = x.shape[:2]
    out = np.zeros_like(x)
    for factor in factors:
        crop_h, crop_w = int(np.ceil(height / factor)), int(np.ceil(width / factor))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        zoomed = ndimage.zoom(x[top : top + crop_h, left : left + crop_w], (factor, factor, 1), order=1)
        if profile == "cifar":
            trim_h, trim_w = (zoomed.shape[0] - height) // 2, (zoomed.shape[1] - width) // 2
            zoomed = zoomed[trim_h : trim_h + height, trim_w : trim_w + width]
        out += zoomed[:height, :width]
    return truncate((x + out) / (len(factors) + 1))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_zoom_blur(profile: str, severity: int) -> None:
    # (For factors below 1.5 the zoomed crop exceeds the image by at most one pixel, so CIFAR-10-C's centre
    # trim and the fork's top-left crop coincide; they differ for snow's larger zooms.)
    factors = blur.zoom_factors(parameters(profile, "zoom_blur", severity))
    images = IMAGES[profile]
    for image, ours in zip(images, corrupt(images, "zoom_blur", severity, profile=profile), strict=True):
        assert_close(ours, reference_zoom_blur(image, factors, profile))


def test_zoom_blur_factor_counts() -> None:
    counts = {profile: [len(blur.zoom_factors(p)) for p in TABLES[profile]["zoom_blur"]] for profile in PROFILES}
    assert counts == {"cifar": [7, 12, 16, 21, 26], "imagenet": [12, 16, 11, 13, 11]}


def test_clipped_zoom_keeps_scipys_zeroed_overshoot_sample() -> None:
    # scipy.ndimage.zoom(order=1) zeroes the last sample when its coordinate overshoots by rounding (a crop
    # of 15 zoomed by 1.75 to 26); the generators inherit that, and so must we.
    layer = np.ones((1, 25, 25, 1))
    ours = blur.clipped_zoom(layer, 1.75, "all")[0, :, :, 0]
    expected = ndimage.zoom(layer[0, 5:20, 5:20], (1.75, 1.75, 1), order=1)[:, :, 0]
    assert ours.shape == expected.shape == (26, 26) and expected[-1].max() == 0
    np.testing.assert_allclose(ours, expected, atol=1e-12)


# ------------------------------------------------------------------ noise


def moments(values: np.ndarray) -> tuple[float, float]:
    values = values.astype(np.float64)
    return values.mean(), values.std()


def check_moments(ours: np.ndarray, simulated: np.ndarray) -> None:
    """Two samples of the same distribution: means within 5 standard errors, stds within 5 of theirs."""
    count = ours.size
    (mean_a, std_a), (mean_b, std_b) = moments(ours), moments(simulated)
    standard_error = np.sqrt((std_a**2 + std_b**2) / count)
    assert abs(mean_a - mean_b) < 5 * standard_error + 1e-9, (mean_a, mean_b)
    # A sample std varies by about std / sqrt(2 n) for near-normal data (x2 for clipped or discrete
    # outputs); the difference of two such stds gets 5 of those.
    assert abs(std_a - std_b) < 5 * 2 * max(std_a, std_b) / np.sqrt(count) + 1e-9, (std_a, std_b)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("level", [64, 128, 200])
def test_gaussian_shot_speckle_noise_distributions(profile: str, severity: int, level: int) -> None:
    images = grey(level)
    rng = np.random.default_rng(severity * 1000 + level)
    x = images / 255.0
    std = parameters(profile, "gaussian_noise", severity)
    check_moments(
        corrupt(images, "gaussian_noise", severity, profile=profile), truncate(x + rng.normal(0, std, x.shape))
    )
    photons = parameters(profile, "shot_noise", severity)
    check_moments(
        corrupt(images, "shot_noise", severity, profile=profile), truncate(rng.poisson(x * photons) / photons)
    )
    std = parameters(profile, "speckle_noise", severity)
    check_moments(
        corrupt(images, "speckle_noise", severity, profile=profile), truncate(x + x * rng.normal(0, std, x.shape))
    )


def test_noise_std_matches_its_parameter_away_from_clipping() -> None:
    # Mid-grey, smallest CIFAR severity: no clipping, so the std is the parameter itself (+ 1/12 quantisation).
    out = corrupt(grey(128, size=128), "gaussian_noise", 1).astype(np.float64)
    assert abs(out.std() - np.sqrt((0.04 * 255) ** 2 + 1 / 12)) < 0.05 * 0.04 * 255
    assert abs(out.mean() - (128 - 0.5)) < 0.1  # truncation lowers the mean by half a level
    # Speckle: std proportional to intensity.
    dark = corrupt(grey(60, size=128), "speckle_noise", 2).astype(np.float64).std()
    bright = corrupt(grey(180, size=128), "speckle_noise", 2).astype(np.float64).std()
    assert abs(bright / dark - 3.0) < 0.15
    # Shot noise: Poisson variance, var(count) = mean(count) = x * c.
    photons = 50
    counts = (corrupt(grey(128, size=128), "shot_noise", 5).astype(np.float64) + 0.5) / 255 * photons
    assert abs(counts.var() / (128 / 255 * photons) - 1) < 0.06


@pytest.mark.parametrize("photons", [3.0, 50.0, 500.0])
def test_poisson_inversion_tables(photons: float) -> None:
    cdf, guide, value_of_count = noise._poisson_tables(photons)
    counts = np.arange(cdf.shape[1])
    for level in (1, 100, 255):
        rate = level / 255.0 * photons
        expected = stats.poisson.cdf(counts[:-1], rate)
        np.testing.assert_allclose(cdf[level, :-1], expected, atol=1e-12)
        assert stats.poisson.sf(counts[-1] - 1, rate) < 1e-15  # the folded tail is negligible
    assert cdf[0, 0] == 1.0  # level 0 is always 0 photons
    # A chi-square goodness of fit of the sampler itself.
    image = np.full((1, 200, 250, 3), 77, dtype=np.uint8)
    sampled = noise.shot_noise(image, photons, [np.random.default_rng(5)], "cifar")
    rate = 77 / 255.0 * photons
    observed = np.bincount(sampled.ravel(), minlength=256).astype(np.float64)
    probabilities = np.zeros(256)
    np.add.at(probabilities, value_of_count[counts[:-1]], stats.poisson.pmf(counts[:-1], rate))
    keep = probabilities * image.size > 20
    expected = probabilities[keep] / probabilities[keep].sum() * observed[keep].sum()
    assert stats.chisquare(observed[keep], expected).pvalue > 1e-4


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_fractions(profile: str, severity: int) -> None:
    amount = parameters(profile, "impulse_noise", severity)
    out = corrupt(grey(128, size=128), "impulse_noise", severity, profile=profile)
    count = out.size
    for value in (0, 255):  # salt and pepper each amount / 2, per array element
        fraction = (out == value).mean()
        assert abs(fraction - amount / 2) < 5 * np.sqrt(amount / 2 * (1 - amount / 2) / count)
    assert set(np.unique(out)) == {0, 128, 255}
    # Channels are hit independently: a pixel whose three channels all flipped is rare (amount^3).
    all_flipped = (out != 128).all(axis=-1).mean()
    assert all_flipped < amount**3 + 5 * np.sqrt(amount**3 / (count / 3))


# ------------------------------------------------------------------ glass blur


def reference_copies(image: np.ndarray, offsets: np.ndarray, delta: int) -> np.ndarray:
    """The generators' loop, in Python, on numpy views: `x[h, w], x[h', w'] = x[h', w'], x[h, w]`."""
    x = image.copy()
    height, width = x.shape[:2]
    for iteration in range(offsets.shape[0]):
        for a, h in enumerate(range(height - delta, delta, -1)):
            for b, w in enumerate(range(width - delta, delta, -1)):
                dx, dy = offsets[iteration, a, b]
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


@pytest.mark.parametrize("delta", [1, 2, 3, 4])
def test_glass_copy_routine_matches_the_reference_loop(delta: int) -> None:
    rng = np.random.default_rng(delta)
    image = rng.integers(0, 256, size=(21, 17, 3), dtype=np.uint8)
    offsets = rng.integers(-delta, delta, size=(2, 21 - 2 * delta, 17 - 2 * delta, 2), dtype=np.int8)
    ours = image[None].copy()
    blur.glass_copy_pixels(ours, offsets[None], delta)
    np.testing.assert_array_equal(ours[0], reference_copies(image, offsets, delta))


def test_glass_blur_offsets_are_minus_one_or_zero_at_cifar_delta_one() -> None:
    # Severity 1 blurs with sigma 0.05 (an identity kernel), so each pixel comes from one source pixel; with
    # unique colours the source is identifiable. For d=1 every source is still unmoved when it is read.
    ys, xs = np.mgrid[0:32, 0:32]
    image = np.stack([ys * 7, xs * 7, (ys * 32 + xs) % 251], axis=-1).astype(np.uint8)
    assert len({tuple(p) for p in image.reshape(-1, 3)}) == 1024
    counts = np.zeros((2, 2))
    for seed in range(6):
        out = corrupt(image, "glass_blur", 1, profile="cifar", seed=seed)
        np.testing.assert_array_equal(out[:2], image[:2])
        np.testing.assert_array_equal(out[:, :2], image[:, :2])
        for h in range(2, 32):
            for w in range(2, 32):
                matches = [(dy, dx) for dy in (-1, 0) for dx in (-1, 0) if (out[h, w] == image[h + dy, w + dx]).all()]
                assert len(matches) == 1, (h, w)
                counts[matches[0][0] + 1, matches[0][1] + 1] += 1
    fractions = counts / counts.sum()
    n = counts.sum()
    assert np.all(np.abs(fractions - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)), fractions


@pytest.mark.parametrize("profile", PROFILES)
def test_glass_blur_is_blur_copy_blur(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the offset draw scripted, the whole corruption equals blur -> uint8 -> reference loop -> blur.
    images = IMAGES[profile][:1]
    for severity in SEVERITIES:
        sigma, delta, iterations = parameters(profile, "glass_blur", severity)
        height, width = images.shape[1:3]
        shape = (iterations, height - 2 * delta, width - 2 * delta, 2)
        offsets = np.random.default_rng(severity).integers(-delta, delta, size=shape, dtype=np.int8)
        monkeypatch.setattr(blur, "uniform_int8", lambda generator, low, high, shape, fixed=offsets: fixed)
        ours = blur.glass_blur(images, parameters(profile, "glass_blur", severity), [None], profile)[0]
        x = images[0] / 255.0
        first = np.uint8(ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest", truncate=4.0) * 255)
        copied = reference_copies(first, offsets, delta) / 255.0
        assert_close(ours, truncate(ndimage.gaussian_filter(copied, (sigma, sigma, 0), mode="nearest", truncate=4.0)))


# ------------------------------------------------------------------ motion blur


def reference_motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage written out: one-sided Gaussian taps along the angle, edges replicated."""
    width = 2 * int(np.ceil(radius)) + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    height, image_width = image.shape[:2]
    out = np.zeros(image.shape, dtype=np.float64)
    ys, xs = np.mgrid[0:height, 0:image_width]
    point_y, point_x = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
    for i, weight in enumerate(weights):  # offset = ceil(i * point / hypot(point) - 0.5), as effect.c has it
        oy = int(np.ceil(i * point_y / np.hypot(point_y, point_x) - 0.5))
        ox = int(np.ceil(i * point_x / np.hypot(point_y, point_x) - 0.5))
        out += weight * image[np.clip(ys + oy, 0, height - 1), np.clip(xs + ox, 0, image_width - 1)]
    return out


@pytest.mark.parametrize("angle", [0.0, 17.0, -38.5, 45.0, -120.0])
def test_motion_blur_kernel(angle: float) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        blur.motion_blur_image(image, 9, 2.5, angle), reference_motion_blur(image, 9, 2.5, angle), atol=2e-3
    )
    # One-sided: an impulse spreads only to pixels that read it, i.e. backwards along the angle.
    impulse = np.zeros((41, 41, 1), dtype=np.uint8)
    impulse[20, 20] = 255
    out = blur.motion_blur_image(impulse, 6, 2, angle)[..., 0]
    taps = np.exp(-(np.arange(13) ** 2) / 8.0)
    taps /= taps.sum()
    ys, xs = np.nonzero(out > 1e-9)
    offsets_along = (20 - xs) * np.cos(np.deg2rad(angle)) + (20 - ys) * np.sin(np.deg2rad(angle))
    assert offsets_along.min() > -0.5 and np.isclose(out.sum(), 255, atol=1e-3)
    assert np.isclose(out[20, 20], 255 * taps[0], atol=1e-3)  # tap 0 reads the pixel itself


class FixedAngle:
    """A stand-in Generator whose uniform draw is a chosen angle."""

    def __init__(self, angle: float) -> None:
        self.angle = angle

    def uniform(self, low: float, high: float) -> float:
        assert (low, high) == (-45, 45)
        return self.angle


@pytest.mark.parametrize("profile", PROFILES)
def test_motion_blur_rounds_like_imagemagick_or_truncates_like_the_fork(profile: str) -> None:
    images = IMAGES[profile]
    for severity in SEVERITIES:
        radius, sigma = parameters(profile, "motion_blur", severity)
        for image, angle in zip(images, (12.5, -31.0, 44.0), strict=False):
            ours = blur.motion_blur(
                image[None], parameters(profile, "motion_blur", severity), [FixedAngle(angle)], profile
            )
            exact = np.clip(reference_motion_blur(image, radius, sigma, angle), 0, 255)
            expected = np.floor(exact + 0.5) if profile == "cifar" else np.floor(exact)
            assert_close(ours[0], expected.astype(np.uint8))
            assert (ours[0] == expected).mean() > 0.99  # off by one only where float32 sums straddle a boundary


def test_motion_blur_angles_stay_within_45_degrees_of_horizontal() -> None:
    impulse = np.zeros((1, 61, 61, 3), dtype=np.uint8)
    impulse[0, 30, 30] = 255
    for seed in range(20):
        out = corrupt(impulse, "motion_blur", 5, profile="cifar", seed=seed)[0, ..., 0].astype(np.float64)
        ys, xs = np.nonzero(out)
        weights = out[ys, xs]
        dx, dy = np.average(30 - xs, weights=weights), np.average(30 - ys, weights=weights)
        assert dx > 0 and abs(dy) <= dx + 0.5  # the trail lies to the left, within the +-45 degree cone
        assert abs(out.sum() - 255) < 20  # rounding per pixel, total preserved


# ------------------------------------------------------------------ snow, frost, fog, spatter


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_snow_blend_floor_and_streak_direction(profile: str, severity: int) -> None:
    params = parameters(profile, "snow", severity)
    black = np.zeros((6, 64, 64, 3), dtype=np.uint8)
    out = corrupt(black, "snow", severity, profile=profile, seed=4).astype(np.float64)
    # Black x: max(x, grey * 1.5 + 0.5) = 0.5, so the floor is (1 - blend) * 0.5 everywhere.
    floor = np.floor(np.float32(1 - params.blend) * np.float32(0.5) * 255)
    assert out.min() >= floor - 1 and (out == floor).mean() > 0.05
    layer = out[..., 0] - floor
    assert np.array_equal(out[..., 0], out[..., 2])  # the snow layer is grey
    # Streaks fall within 45 degrees of vertical: horizontal gradients dominate.
    gx = np.abs(np.diff(layer, axis=2)).mean()
    gy = np.abs(np.diff(layer, axis=1)).mean()
    assert gx > gy


def load_texture(index: int) -> np.ndarray:
    name = weather.FROST_TEXTURES[index]
    with importlib.resources.as_file(importlib.resources.files("imagecorruptions") / "frost" / name) as path:
        return cv2.imread(str(path))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_frost_replays_texture_crop_and_weights(profile: str, severity: int) -> None:
    images = IMAGES[profile]
    height, width = images.shape[1:3]
    image_weight, frost_weight = parameters(profile, "frost", severity)
    ours = corrupt(images, "frost", severity, profile=profile, seed=9, index=np.arange(len(images)))
    profile_number = PROFILES.index(profile)
    for n, image in enumerate(images):
        rng = np.random.default_rng(np.random.SeedSequence([9, n, 8, severity, profile_number]))
        index = rng.integers(5 if profile == "cifar" else 6)
        texture = load_texture(index)
        if profile == "cifar":
            texture = cv2.resize(texture, (0, 0), fx=0.2, fy=0.2)
        else:
            scale = 1.1 * max(1, height / texture.shape[0], width / texture.shape[1])
            size = (int(np.ceil(texture.shape[1] * scale)), int(np.ceil(texture.shape[0] * scale)))
            texture = cv2.resize(texture, size, interpolation=cv2.INTER_CUBIC)
        top = rng.integers(0, texture.shape[0] - height)
        left = rng.integers(0, texture.shape[1] - width)
        crop = texture[top : top + height, left : left + width][..., [2, 1, 0]]
        expected = np.uint8(np.clip(image_weight * image + frost_weight * crop, 0, 255))
        np.testing.assert_array_equal(ours[n], expected)
    assert weather.frost_textures(profile) == (5 if profile == "cifar" else 6)


def reference_plasma(mapsize: int, wibble_decay: float, uniform) -> np.ndarray:
    """The generators' plasma_fractal (diamond-square), with `uniform(low, high, shape)` as its draws."""
    maparray = np.empty((mapsize, mapsize))
    maparray[0, 0] = 0
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array):
        return array / 4 + wibble * uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + (ulgrid + np.roll(ulgrid, -1, axis=1))
        maparray[0:mapsize:stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + (ulgrid + np.roll(ulgrid, -1, axis=0))
        maparray[stepsize // 2 : mapsize : stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibble_decay
    maparray -= maparray.min()
    return maparray / maparray.max()


@pytest.mark.parametrize(("mapsize", "decay"), [(32, 3.0), (32, 1.75), (64, 1.4)])
def test_plasma_fractal_matches_the_reference_draw_for_draw(mapsize: int, decay: float) -> None:
    ours = weather.plasma_fractal(np.random.default_rng(11), mapsize, decay)
    expected = reference_plasma(mapsize, decay, np.random.default_rng(11).uniform)
    np.testing.assert_allclose(ours, expected, atol=1e-12)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_fog_adds_strength_times_a_unit_fractal(profile: str, severity: int) -> None:
    strength, _ = parameters(profile, "fog", severity)
    level = 0.6
    image = np.full((1, 64, 64, 3), round(level * 255), dtype=np.uint8)
    x = image[0, 0, 0, 0] / 255.0
    for seed in range(3):
        out = corrupt(image, "fog", severity, profile=profile, seed=seed)[0].astype(np.float64)
        # out = (x + s * map) * x / (x + s): recover the map, which the generator normalised to [0, 1].
        recovered = ((out[..., 0] + 0.5) / 255 * (x + strength) / x - x) / strength
        step = (x + strength) / x / 255 / strength  # one intensity level, in map units
        assert recovered.min() < 2 * step and recovered.max() > 1 - 2 * step
        assert np.array_equal(out[..., 0], out[..., 1])  # fog is grey
        assert np.corrcoef(recovered[:, 1:].ravel(), recovered[:, :-1].ravel())[0, 1] > 0.5  # smooth


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_spatter_colour_and_mask(profile: str, severity: int) -> None:
    params = parameters(profile, "spatter", severity)
    if params.mud:  # mud on white: opaque brown where the blurred mask is >= 0.8, nothing elsewhere
        white = np.full((4, 64, 64, 3), 255, dtype=np.uint8)
        out = corrupt(white, "spatter", severity, profile=profile, seed=2).astype(np.float64)
        changed = (out < 255).any(axis=-1)
        assert changed.mean() > 0.001
        mask = (255 - out[..., 0][changed]) / (255 - 63)
        assert mask.min() > 0.8 - 2 / 192 and mask.max() <= 1 + 2 / 192
        np.testing.assert_allclose(255 - out[changed], np.outer(mask, 255 - np.array([63, 42, 20])), atol=3)
    else:  # water on black: mask * pale turquoise, the mask peaking at exactly `intensity`
        black = np.zeros((4, 64, 64, 3), dtype=np.uint8)
        out = corrupt(black, "spatter", severity, profile=profile, seed=2).astype(np.float64)
        for image in out:
            assert abs(image[..., 1].max() - np.floor(params.intensity * 238)) <= 1
            bright = image[..., 1] > 40
            np.testing.assert_allclose(image[..., 0][bright] / image[..., 1][bright], 175 / 238, atol=0.03)
            np.testing.assert_array_equal(image[..., 1], image[..., 2])


# ------------------------------------------------------------------ elastic transform


def test_elastic_sampler_matches_scipy_map_coordinates() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 23, 31, 3)).astype(np.float32)
    shift_y = (rng.normal(0, 6, size=(1, 23, 31))).astype(np.float32)
    shift_x = (rng.normal(0, 6, size=(1, 23, 31))).astype(np.float32)
    ours = digital.sample_reflect(image, shift_y, shift_x)
    ys, xs, cs = np.meshgrid(np.arange(23), np.arange(31), np.arange(3), indexing="ij")
    coordinates = [ys + shift_y[0][..., None], xs + shift_x[0][..., None], cs]
    expected = ndimage.map_coordinates(image[0], coordinates, order=1, mode="reflect")
    np.testing.assert_array_equal(ours[0], np.uint8(np.clip(expected, 0, 1) * 255))


def test_elastic_cifar_severity_one_is_the_affine_step_alone() -> None:
    images = IMAGES["cifar"]
    ours = corrupt(images, "elastic_transform", 1, profile="cifar", seed=5)
    for n, image in enumerate(images):
        rng = np.random.default_rng(np.random.SeedSequence([5, n, 12, 1, 0]))
        x = np.array(image, dtype=np.float32) / 255.0
        centre = np.float32((32, 32)) // 2
        source = np.float32([centre + 10, [centre[0] + 10, centre[1] - 10], centre - 10])
        target = source + rng.uniform(-2.56, 2.56, size=source.shape).astype(np.float32)
        warped = cv2.warpAffine(x, cv2.getAffineTransform(source, target), (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        assert_close(ours[n], truncate(warped), tolerance=0)
        assert not np.array_equal(ours[n], image)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("severity", [2, 3, 4, 5])
def test_elastic_displacement_fields(profile: str, severity: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fields are alpha * gaussian(U(-b, b), sigma, mode 'reflect', truncate 3): compare their spread with a
    # direct simulation of that formula (scipy), borders and all.
    size, count = (32, 64) if profile == "cifar" else (160, 4)
    params = parameters(profile, "elastic_transform", severity)
    if profile == "cifar":
        sigma, bound = params.sigma, 1.0
    else:
        sigma, bound = params.sigma_fraction * size, params.bound_fraction * size
    captured = []
    monkeypatch.setattr(digital, "sample_reflect", lambda image, dy, dx: captured.append((dy, dx)) or image)
    corrupt(np.zeros((count, size, size, 3), dtype=np.uint8), "elastic_transform", severity, profile=profile)
    dy, dx = captured[0]
    rng = np.random.default_rng(0)
    simulated = np.stack(
        [
            params.alpha
            * ndimage.gaussian_filter(rng.uniform(-bound, bound, (size, size)), sigma, mode="reflect", truncate=3)
            for _ in range(2 * count)
        ]
    )
    ours = np.concatenate([dy, dx])
    assert abs(ours.std() / simulated.std() - 1) < (0.15 if profile == "cifar" else 0.05)
    assert abs(ours.mean()) < 0.2 * simulated.std()
    lag = [np.corrcoef(f[:, 1:].ravel(), f[:, :-1].ravel())[0, 1] for f in (ours, simulated)]
    assert abs(lag[0] - lag[1]) < 0.05  # same smoothness
    assert not np.allclose(dx, dy)


# ------------------------------------------------------------------ the tables themselves

# Copied from make_cifar_c.py and imagecorruptions 1.1.5 (see docs/corruptions.md), written out here so
# that a slip in profiles.py cannot hide behind the formula tests above, which read profiles.py.
REFERENCE_TABLES = {
    "cifar": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "speckle_noise": [0.06, 0.1, 0.12, 0.16, 0.2],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "zoom_blur": [(1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)],
        "snow": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ],
        "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "elastic_transform": [(0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6), (3.2, 0.96, 0.96)],
        "spatter": [
            (0.62, 0.1, 0.7, 0.7, 0.5, False),
            (0.65, 0.1, 0.8, 0.7, 0.5, False),
            (0.65, 0.3, 1, 0.69, 0.5, False),
            (0.65, 0.1, 0.7, 0.69, 0.6, True),
            (0.65, 0.1, 0.5, 0.68, 0.6, True),
        ],
    },
    "imagenet": {
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "speckle_noise": [0.15, 0.2, 0.35, 0.45, 0.6],
        "gaussian_blur": [1, 2, 3, 4, 6],
        "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
        "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)],
        "snow": [
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ],
        "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
        "fog": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
        "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
        "jpeg_compression": [25, 18, 15, 10, 7],
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
        "elastic_transform": [
            (12.5, 0.01, 0.005),
            (16.25, 0.01, 0.005),
            (21.25, 0.01, 0.005),
            (25, 0.01, 0.005),
            (30, 0.01, 0.005),
        ],
        "spatter": [
            (0.65, 0.3, 4, 0.69, 0.6, False),
            (0.65, 0.3, 3, 0.68, 0.6, False),
            (0.65, 0.3, 2, 0.68, 0.5, False),
            (0.65, 0.3, 1, 0.65, 1.5, True),
            (0.67, 0.4, 1, 0.65, 1.5, True),
        ],
    },
}


@pytest.mark.parametrize("profile", PROFILES)
def test_tables_match_the_reference_generators(profile: str) -> None:
    assert set(REFERENCE_TABLES[profile]) == set(TABLES[profile])
    for name, rows in REFERENCE_TABLES[profile].items():
        for severity, expected in zip(SEVERITIES, rows, strict=True):
            ours = parameters(profile, name, severity)
            ours = tuple(ours) if isinstance(ours, tuple) else (ours,)
            expected = expected if isinstance(expected, tuple) else (expected,)
            np.testing.assert_allclose(
                np.array(ours, dtype=float), np.array(expected, dtype=float), rtol=1e-12, err_msg=f"{name} {severity}"
            )
