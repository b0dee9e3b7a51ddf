"""Seeded, class-stratified subsets: evaluation subsets and measurement images that cover every class.

Image-folder datasets are ordered by class, so "the first N images" (Lightning's `limit_test_batches`, or
the first 256 training images of a measure) can be one or two classes only: the first 2,000 CIFAR-10 test
images of an ImageFolder tree are airplanes and automobiles. `stratified_indices` draws each class in
proportion to its share of the set (largest remainders for the rounding), at random within the class under a
fixed seed, so every run of a study sees the same images.
"""

from __future__ import annotations

import numpy as np


def stratified_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` indices into `labels` (sorted), each class represented in proportion to its frequency."""
    labels = np.asarray(labels)
    if count >= len(labels):
        return np.arange(len(labels))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
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
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def classes_covered(labels: np.ndarray, first: int) -> int:
    """How many classes the first `first` labels hold."""
    return len(np.unique(np.asarray(labels)[:first]))
