"""Seeded, class-stratified subsets: evaluation subsets and measurement images that cover every class.

Image-folder datasets are ordered by class, so "the first N images" (Lightning's `limit_test_batches`, or
the first 256 training images of a measure) can be one or two classes only: the first 2,000 CIFAR-10 test
images of an ImageFolder tree are airplanes and automobiles. `stratified_indices` draws each class in
proportion to its share of the set (largest remainders for the rounding), at random within the class under a
fixed seed, so every run of a study sees the same images. Evaluation subsets keep the set's order; measurement
images come shuffled (under the same seed), so that a measure taking only its first batch of them (Eq. 4's
per-sample Jacobians) does not see the low classes only.
"""

from __future__ import annotations

import numpy as np


def stratified_indices(labels: np.ndarray, count: int, seed: int = 0, shuffle: bool = False) -> np.ndarray:
    """`count` indices into `labels`, each class represented in proportion to its frequency: sorted, or with
    `shuffle` in a random order drawn from `seed` (any prefix then holds about every class's share)."""
    labels = np.asarray(labels)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= len(labels):
        every = np.arange(len(labels), dtype=np.int64)
        return np.random.default_rng(seed).permutation(every) if shuffle else every
    classes, sizes = np.unique(labels, return_counts=True)
    share = sizes * count / len(labels)
    quota = np.floor(share).astype(np.int64)
    # Largest remainders get the images left over by rounding down (ties: the larger class, then label order).
    leftover = count - int(quota.sum())
    order = np.lexsort((classes, -sizes, -(share - quota)))
    quota[order[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota,
                                                                                              strict=True)]
    chosen = np.sort(np.concatenate(chosen)).astype(np.int64)
    return rng.permutation(chosen) if shuffle else chosen


def classes_covered(labels: np.ndarray, first: int) -> int:
    """How many classes the first `first` labels hold."""
    return len(np.unique(np.asarray(labels)[:first]))
