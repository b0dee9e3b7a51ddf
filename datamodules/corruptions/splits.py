"""Corrupted test splits: which to serve, generated on the fly or cached, or read from the official release.

- `CorruptedTest`: the DataModule setting (which corruptions and severities, profile, seed, cache, release).
- `OnTheFlyCorruption`: a batch transform that corrupts each batch as it is loaded, from each image's
  dataset index, so results do not depend on batch size, worker count or order.
- `CorruptionCache`: lossless `.npy` copies, one per (corruption, severity), written atomically beside a
  manifest (engine and library versions, profile, seed, fingerprint of the clean images); a cache made by
  another engine, profile, seed or test set is regenerated, never reused.
- `CIFARCRelease`: the official CIFAR-10-C / CIFAR-100-C files, memory-mapped and sliced by severity, with
  the labels checked against the clean test set and optional MD5 checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.array_cache import digest_path, load_array, save_array
from datamodules.corruptions.engine import corrupt, engine_fingerprint
from datamodules.errors import DataError
from records.preemption import preemption_blocked
from records.splits import CORRUPTIONS, SEVERITIES
from records.store import write_atomically

RELEASE_IMAGES_PER_SEVERITY = 10_000


@dataclass(frozen=True)
class CorruptedTest:
    """Which corrupted copies of the test set a DataModule serves after the clean one.

    Args:
        corruptions: "all" (the 19 of Hendrycks & Dietterich), a list of names, or [] for none.
        severities: any of 1..5.
        profile: "cifar" (the CIFAR-10-C tables) or "imagenet" (the ImageNet-C tables, any image size).
        seed: seeds every image's corruption together with its index.
        cache_dir: keep generated splits here as .npy (reused across runs); null corrupts on the fly.
        release_root: a folder with the official CIFAR-10-C / CIFAR-100-C .npy files; used instead of
            generating (cifar profile, CIFAR data only).
        verify_md5: check the release files against `MD5SUMS` in release_root (slow: 2.7 GB).
        workers: processes that generate missing cached splits in parallel.
    """

    corruptions: Literal["all"] | list[str] = "all"
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    profile: Literal["cifar", "imagenet"] = "cifar"
    seed: int = 0
    cache_dir: str | None = None
    release_root: str | None = None
    verify_md5: bool = False
    workers: int = 1

    def __post_init__(self) -> None:
        names = self.names
        unknown = [n for n in names if n not in CORRUPTIONS]
        if unknown:
            raise DataError(f"unknown corruption(s) {unknown}; choose from: {', '.join(CORRUPTIONS)}")
        bad = [s for s in self.severities if isinstance(s, bool) or s not in SEVERITIES]
        if bad:
            raise DataError(f"corruption severities must be in 1..5, got {bad}")

    @property
    def names(self) -> list[str]:
        return list(CORRUPTIONS) if self.corruptions == "all" else list(self.corruptions)

    def splits(self) -> list[tuple[str, int]]:
        """(corruption, severity) pairs in the canonical order."""
        return [(name, severity) for name in self.names for severity in sorted(set(self.severities))]


class OnTheFlyCorruption:
    """Batch transform (images, dataset indices) -> corrupted images."""

    def __init__(self, corruption: str, severity: int, profile: str, seed: int) -> None:
        self.corruption, self.severity, self.profile, self.seed = corruption, severity, profile, seed

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return corrupt(images, self.corruption, self.severity, self.profile, self.seed, index=indices)


def fingerprint(images: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(images).view(np.uint8).data).hexdigest()[:16]


class CorruptionCache:
    """Generated corrupted test splits kept as lossless .npy files in one folder per (profile, seed, images)."""

    def __init__(self, directory: str | Path, clean_images: np.ndarray, profile: str, seed: int) -> None:
        self.manifest = {
            # The engine version and the library versions its bytes depend on (random algorithms, codecs).
            "engine_version": engine_fingerprint(),
            "profile": profile,
            "seed": seed,
            "images": fingerprint(clean_images),
            "shape": list(clean_images.shape),
        }
        key = hashlib.sha1(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:12]
        self.directory = Path(directory) / f"{profile}-seed{seed}-{key}"
        self.clean_images = clean_images
        self.profile, self.seed = profile, seed
        self.source = key  # every split's digest record names the manifest it was generated under

    def path(self, corruption: str, severity: int) -> Path:
        return self.directory / f"{corruption}-{severity}.npy"

    def _manifest_matches(self) -> bool:
        try:
            return json.loads((self.directory / "manifest.json").read_text()) == self.manifest
        except (OSError, ValueError):
            return False

    def _ensure_manifest(self) -> None:
        if self._manifest_matches():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in [*self.directory.glob("*.npy"), *self.directory.glob("*.digest")]:
            stale.unlink()  # a folder whose manifest differs is never trusted
        write_atomically(self.directory / "manifest.json",
                         json.dumps(self.manifest, indent=2, sort_keys=True).encode())

    def load(self, corruption: str, severity: int) -> np.ndarray:
        """The corrupted split, generated and saved first if missing, damaged or foreign (memory-mapped when
        cached; its digest is checked on every load)."""
        self._ensure_manifest()
        path = self.path(corruption, severity)
        images = load_array(path, self.source, what="corrupted-split cache", mmap=True)
        if images is not None and images.shape == self.clean_images.shape and images.dtype == np.uint8:
            return images
        images = corrupt(self.clean_images, corruption, severity, self.profile, self.seed, index=0)
        save_array(path, images, self.source)
        return np.load(path, mmap_mode="r")

    def discard_damaged(self, splits: Iterable[tuple[str, int]]) -> int:
        """Check the digest of every cached split (reads them all) and delete those that fail, with a warning,
        so they count as missing; returns how many were deleted. `load` checks each split it serves anyway."""
        if not self._manifest_matches():
            return 0
        discarded = 0
        for corruption, severity in splits:
            path = self.path(corruption, severity)
            if path.exists() and load_array(path, self.source, what="corrupted-split cache", mmap=True) is None:
                path.unlink(missing_ok=True)
                digest_path(path).unlink(missing_ok=True)
                discarded += 1
        return discarded

    def missing(self, splits: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        if not self._manifest_matches():
            return list(splits)
        return [(c, s) for c, s in splits if not (self.path(c, s).exists() and digest_path(self.path(c, s)).exists())]

    def generate(self, splits: Iterable[tuple[str, int]], workers: int = 1, progress=None) -> int:
        """Write every missing split, `workers` processes at a time; returns how many were written.

        `progress(corruption, severity)` is called after each split is written.
        """
        todo = self.missing(list(splits))
        self._ensure_manifest()
        if workers <= 1:
            for corruption, severity in todo:
                self.load(corruption, severity)
                if progress:
                    progress(corruption, severity)
            return len(todo)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent may hold torch / OpenCV thread pools that a forked child would inherit
        # in a broken state. The workers start with SLURM's preemption signal blocked: it is the parent's to take.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            with preemption_blocked():  # the pool starts its processes as the splits are submitted
                jobs = {
                    pool.submit(_write_split, self.path(c, s), self.clean_images, c, s, self.profile, self.seed,
                                self.source): (c, s)
                    for c, s in todo
                }
            try:
                for job in as_completed(jobs):
                    job.result()
                    if progress:
                        progress(*jobs[job])
            except BaseException:  # a signal, a failed split: end with the splits being written, start no other
                pool.shutdown(cancel_futures=True)
                raise
        return len(todo)


def _write_split(path: Path, clean: np.ndarray, corruption: str, severity: int, profile: str, seed: int,
                 source: str) -> None:
    save_array(path, corrupt(clean, corruption, severity, profile, seed, index=0), source)


class CIFARCRelease:
    """The official CIFAR-10-C / CIFAR-100-C release: `<root>/<corruption>.npy` + `labels.npy`."""

    def __init__(self, root: str | Path, clean_labels: np.ndarray, verify_md5: bool = False) -> None:
        self.root = Path(root).expanduser()
        if not (self.root / "labels.npy").is_file():
            raise DataError(
                f"no CIFAR-C release at '{self.root}': expected labels.npy and <corruption>.npy files "
                "(the CIFAR-10-C / CIFAR-100-C folder from Zenodo 2535967 / 3555552)"
            )
        self.n = len(clean_labels)
        labels = self._open("labels", ndim=1)
        expected = np.tile(np.asarray(clean_labels), len(SEVERITIES))
        if labels.shape != expected.shape or not np.array_equal(labels, expected):
            raise DataError(
                f"{self.root / 'labels.npy'} does not match the clean test labels repeated 5 times; "
                "is this the release for the same dataset?"
            )
        self.checksums = self._read_checksums() if verify_md5 else None
        self._verified: set[str] = set()

    def _read_checksums(self) -> dict[str, str]:
        listing = self.root / "MD5SUMS"
        if not listing.is_file():
            raise DataError(f"verify_md5 needs {listing} ('<md5>  <file>' lines, as md5sum writes them)")
        try:
            text = listing.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{listing} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                            "it should hold '<md5>  <file>' lines, as md5sum writes them") from None
        sums = {}
        for line in text.splitlines():
            if line.strip():
                digest, _, name = line.strip().partition("  ")
                sums[name.strip().lstrip("*")] = digest
        return sums

    def _open(self, name: str, ndim: int) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"missing {path} in the CIFAR-C release")
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as error:
            raise DataError(f"{path} is not a readable .npy file ({error}); re-download it") from None
        rows = len(SEVERITIES) * self.n
        shape_ok = array.shape[0] == rows and (ndim == 1 or array.shape[1:] == (32, 32, 3))
        if array.ndim != ndim or not shape_ok or array.dtype != np.uint8:
            expected = (rows,) if ndim == 1 else (rows, 32, 32, 3)
            raise DataError(f"{path} has shape {array.shape} {array.dtype}, expected {expected} uint8")
        return array

    def _verify(self, name: str) -> None:
        if self.checksums is None or name in self._verified:
            return
        file = f"{name}.npy"
        if file not in self.checksums:
            raise DataError(f"MD5SUMS in {self.root} has no entry for {file}")
        digest = hashlib.md5()
        with open(self.root / file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != self.checksums[file]:
            raise DataError(f"{self.root / file} fails its MD5 check; re-download it")
        self._verified.add(name)

    def images(self, corruption: str, severity: int) -> np.ndarray:
        """The severity's 10,000 (or n) images, memory-mapped, in the clean test set's order."""
        self._verify(corruption)
        array = self._open(corruption, ndim=4)
        return array[(severity - 1) * self.n : severity * self.n]
