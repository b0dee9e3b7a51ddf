"""Corrupted test splits: settings, on-the-fly determinism, the cache and its manifest, the official release."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import run_cli
from datamodules import ArrayImageDataset, DataError, DigitsDataModule
from datamodules.corruptions import corrupt
from datamodules.corruptions.splits import CIFARCRelease, CorruptedTest, CorruptionCache, OnTheFlyCorruption
from records.store import read_rows


def images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_settings_default_to_all_19_by_5_and_validate():
    assert len(CorruptedTest().splits()) == 95
    subset = CorruptedTest(corruptions=["fog", "contrast"], severities=[5, 1])
    assert subset.splits() == [("fog", 1), ("fog", 5), ("contrast", 1), ("contrast", 5)]
    with pytest.raises(DataError, match="unknown corruption"):
        CorruptedTest(corruptions=["fgo"])
    for severity in (0, 6):
        with pytest.raises(DataError, match="1..5"):
            CorruptedTest(severities=[severity])


def test_on_the_fly_splits_do_not_depend_on_batching():
    clean = images(10)
    dataset = ArrayImageDataset(clean, np.arange(10), OnTheFlyCorruption("shot_noise", 3, "cifar", 7))
    whole, _ = dataset.__getitems__(list(range(10)))
    pieces = [dataset.__getitems__(list(chunk))[0] for chunk in ([0, 1, 2], [3, 4, 5, 6], [7, 8, 9])]
    assert np.array_equal(whole.numpy(), np.concatenate([p.numpy() for p in pieces]))
    reversed_order, _ = dataset.__getitems__(list(range(9, -1, -1)))
    assert np.array_equal(reversed_order.numpy()[::-1], whole.numpy())
    direct = corrupt(clean, "shot_noise", 3, "cifar", 7, index=0)
    assert np.array_equal(whole.permute(0, 2, 3, 1).numpy(), direct)


def test_cache_is_written_once_and_keyed_by_its_manifest(tmp_path):
    clean = images()
    cache = CorruptionCache(tmp_path, clean, "cifar", seed=0)
    first = np.array(cache.load("gaussian_noise", 2))
    path = cache.path("gaussian_noise", 2)
    written = path.stat().st_mtime_ns
    assert np.array_equal(first, corrupt(clean, "gaussian_noise", 2, "cifar", 0))
    assert np.array_equal(CorruptionCache(tmp_path, clean, "cifar", 0).load("gaussian_noise", 2), first)
    assert path.stat().st_mtime_ns == written  # reused, not regenerated
    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["profile"] == "cifar" and "engine_version" in manifest
    # another seed or another test set is another folder: a stale cache is never read
    assert CorruptionCache(tmp_path, clean, "cifar", seed=1).directory != cache.directory
    assert CorruptionCache(tmp_path, images(seed=1), "cifar", seed=0).directory != cache.directory
    assert not list(cache.directory.glob("*.tmp"))


def test_cache_regenerates_a_truncated_file_and_a_foreign_manifest(tmp_path):
    clean = images()
    cache = CorruptionCache(tmp_path, clean, "cifar", seed=0)
    expected = np.array(cache.load("contrast", 3))
    path = cache.path("contrast", 3)
    path.write_bytes(path.read_bytes()[:200])
    assert np.array_equal(cache.load("contrast", 3), expected)
    (cache.directory / "manifest.json").write_text(json.dumps({"engine_version": "0"}))
    assert cache.missing([("contrast", 3)]) == [("contrast", 3)]
    assert np.array_equal(cache.load("contrast", 3), expected)


def test_parallel_generation_matches_serial(tmp_path):
    clean = images(6)
    splits = [("fog", 1), ("pixelate", 4), ("impulse_noise", 5)]
    serial = CorruptionCache(tmp_path / "a", clean, "cifar", 0)
    parallel = CorruptionCache(tmp_path / "b", clean, "cifar", 0)
    assert serial.generate(splits, workers=1) == 3
    assert parallel.generate(splits, workers=2) == 3
    for corruption, severity in splits:
        assert np.array_equal(np.load(serial.path(corruption, severity)), np.load(parallel.path(corruption, severity)))
    assert parallel.generate(splits, workers=2) == 0


def write_release(root, labels: np.ndarray, corruption: str = "fog") -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 256, (5 * len(labels), 32, 32, 3), dtype=np.uint8)
    np.save(root / f"{corruption}.npy", data)
    np.save(root / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    return data


def test_release_is_memory_mapped_and_sliced_by_severity(tmp_path):
    labels = np.arange(20) % 10
    data = write_release(tmp_path, labels)
    release = CIFARCRelease(tmp_path, labels)
    severity3 = release.images("fog", 3)
    assert isinstance(severity3, np.memmap) or isinstance(severity3.base, np.memmap)
    assert np.array_equal(severity3, data[40:60])


def test_release_errors(tmp_path):
    labels = np.arange(20) % 10
    with pytest.raises(DataError, match="no CIFAR-C release"):
        CIFARCRelease(tmp_path / "absent", labels)
    write_release(tmp_path, labels)
    with pytest.raises(DataError, match="does not match the clean test labels"):
        CIFARCRelease(tmp_path, (labels + 1) % 10)
    release = CIFARCRelease(tmp_path, labels)
    (tmp_path / "snow.npy").write_bytes((tmp_path / "fog.npy").read_bytes()[:5000])  # truncated download
    with pytest.raises(DataError, match="snow.npy is not a readable .npy file"):
        release.images("snow", 1)
    np.save(tmp_path / "frost.npy", np.zeros((100, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="frost.npy has shape"):
        release.images("frost", 1)
    with pytest.raises(DataError, match="MD5SUMS"):
        CIFARCRelease(tmp_path, labels, verify_md5=True)
    (tmp_path / "MD5SUMS").write_bytes(b"\xe9t\xe9  fog.npy\n")  # Latin-1, not a listing md5sum writes
    with pytest.raises(DataError, match=r"MD5SUMS is not UTF-8 text \(byte 0 is 0xe9\)"):
        CIFARCRelease(tmp_path, labels, verify_md5=True)
    good = hashlib.md5((tmp_path / "fog.npy").read_bytes()).hexdigest()
    (tmp_path / "MD5SUMS").write_text(f"{good}  fog.npy\n{'0' * 32}  snow.npy\n")
    checked = CIFARCRelease(tmp_path, labels, verify_md5=True)
    assert checked.images("fog", 1).shape == (20, 32, 32, 3)
    with pytest.raises(DataError, match="fails its MD5 check"):
        checked.images("snow", 1)


def test_datamodule_serves_clean_then_corrupted_splits_only_for_test():
    dm = DigitsDataModule(corrupted_test=CorruptedTest(corruptions=["fog", "saturate"], severities=[2]))
    dm.setup("fit")
    assert dm.test_split_names == ["clean"]
    dm.setup("test")
    assert dm.test_split_names == ["clean", "fog/2", "saturate/2"]
    assert len(dm.test_dataloader()) == 3


def test_cli_test_evaluates_every_corrupted_split_into_the_results_store(digits_fast_args, tmp_path, capsys):
    subset = ["--data.init_args.corrupted_test.corruptions", "[gaussian_noise,fog]",
              "--data.init_args.corrupted_test.severities", "[1,5]"]
    assert run_cli("fit", *digits_fast_args, *subset) == 0
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    accuracy = {(r["corruption"], r["severity"]) for r in rows if r["metric"] == "accuracy"}
    assert accuracy == {("clean", 0), ("gaussian_noise", 1), ("gaussian_noise", 5), ("fog", 1), ("fog", 5)}
    assert "all corrupted" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data.init_args.corrupted_test.corruptions", "[fgo]"], "unknown corruption"),
        (["--data.init_args.corrupted_test.severities", "[6]"], "1..5"),
        (["--data.init_args.corrupted_test.severities", "[0]"], "1..5"),
        (["--data.init_args.corrupted_test.profile", "tiny"], "'tiny' is not a valid choice"),
    ],
)
def test_bad_corruption_settings_are_one_line_exit_2(extra, message, digits_fast_args, capsys):
    args = [a for a in digits_fast_args]
    assert run_cli("fit", *args, *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("qreg: error:") and message in err[-1]


def test_corrupt_command_pre_generates_a_cache(tmp_path, capsys):
    args = ["corrupt", "--data", "DigitsDataModule", "--data.init_args.corrupted_test.corruptions", "[contrast]",
            "--data.init_args.corrupted_test.severities", "[1,2]", "--cache_dir", str(tmp_path), "--workers", "1"]
    assert run_cli(*args) == 0
    assert "2 of 2 splits written" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*/contrast-*.npy"))) == 2
    assert run_cli(*args) == 0
    assert "0 of 2 splits written" in capsys.readouterr().out
    bad = ["corrupt", "--data", "DigitsDataModule", "--data.init_args.corrupted_test.corruptions", "[nope]",
           "--cache_dir", str(tmp_path / "x")]
    assert run_cli(*bad) == 2
    assert not (tmp_path / "x").exists()


def test_corruption_grid_command(tmp_path):
    from PIL import Image

    Image.fromarray(images(1)[0]).save(tmp_path / "image.png")
    assert run_cli("corruption-grid", str(tmp_path / "image.png"), "--out", str(tmp_path / "grid.png")) == 0
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[0] > 300 and grid.size[1] > 1000
    assert run_cli("corruption-grid", str(tmp_path / "missing.png"), "--out", str(tmp_path / "g2.png")) == 2
