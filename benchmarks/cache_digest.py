"""Cost of the cache content checks against the work the caches save.

    python benchmarks/cache_digest.py [--archive ../shared/data/cifar10-jpeg.tar.gz]

Decoded-image cache: decoding the CIFAR-10 JPEG test split vs hashing its source files (read + BLAKE2b) and
the decoded array. Corrupted-split cache: generating one split vs hashing it. Each timed in one run, side by
side (best of 3 for the hashes).
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from datamodules.array_cache import array_digest
from datamodules.cifar import CIFAR10_CLASSES, _decode, source_digest
from datamodules.corruptions import corrupt

REPO = Path(__file__).resolve().parents[1]


def best_of(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archive", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.archive) as tar:
            tar.extractall(tmp, members=[m for m in tar.getmembers() if "/test/" in f"/{m.name}"], filter="data")
        test = next(Path(tmp).rglob("test"))
        paths = [p for name in CIFAR10_CLASSES for p in sorted((test / name).iterdir())]
        start = time.perf_counter()
        images = np.stack([_decode(p) for p in paths])
        decode = time.perf_counter() - start
        source = best_of(lambda: source_digest(test, paths))
        array = best_of(lambda: array_digest(images))
        print(f"decoded-image cache, {len(paths)} JPEGs: decode {decode:.2f} s; source digest {source:.3f} s "
              f"({100 * source / decode:.1f} %), array digest {array:.3f} s ({100 * array / decode:.1f} %)")
        start = time.perf_counter()
        corrupted = corrupt(images, "gaussian_noise", 3, "cifar", 0, index=0)
        generate = time.perf_counter() - start
        check = best_of(lambda: array_digest(corrupted))
        print(f"corrupted-split cache, gaussian_noise/3 of {len(images)} images: generate {generate:.2f} s; "
              f"digest {check:.3f} s ({100 * check / generate:.1f} %)")


if __name__ == "__main__":
    main()
