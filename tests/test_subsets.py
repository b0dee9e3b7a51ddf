"""Seeded, class-stratified subsets: evaluation subsets shared by the clean and every corrupted split, and a
warning when Lightning's batch limits would cover only a few classes of a class-ordered set."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from callbacks.flatness import training_batches
from datamodules import DigitsDataModule
from datamodules.cifar import CIFAR10_CLASSES, CIFAR10DataModule
from datamodules.corruptions.splits import CorruptedTest
from datamodules.subsets import stratified_indices

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


def test_stratified_draw_is_proportional_seeded_and_without_repeats():
    labels = np.repeat(np.arange(10), [100] * 5 + [50] * 5)  # class-ordered, like an image folder
    chosen = stratified_indices(labels, 75, seed=3)
    assert len(chosen) == len(set(chosen)) == 75
    assert np.bincount(labels[chosen]).tolist() == [10] * 5 + [5] * 5
    assert np.array_equal(chosen, stratified_indices(labels, 75, seed=3))
    assert not np.array_equal(chosen, stratified_indices(labels, 75, seed=4))
    uneven = stratified_indices(labels, 7, seed=0)  # fewer images than classes: largest remainders first
    assert sorted(labels[uneven].tolist()) == [0, 1, 2, 3, 4, 5, 6]
    assert len(stratified_indices(labels, 10_000)) == len(labels)


def test_test_subset_is_the_same_images_in_the_clean_and_every_corrupted_split():
    dm = DigitsDataModule(test_subset=40, val_subset=30,
                          corrupted_test=CorruptedTest(corruptions=["fog", "impulse_noise"], severities=[2]))
    dm.setup("test")
    full = DigitsDataModule(corrupted_test=CorruptedTest(corruptions=["fog", "impulse_noise"], severities=[2]))
    full.setup("test")
    clean, whole = dm.test_sets["clean"], full.test_sets["clean"]
    assert len(clean) == 40 and len(dm.val_set) == 30
    index = stratified_indices(whole.labels, 40, seed=0)
    assert np.array_equal(clean.images, whole.images[index]) and np.array_equal(clean.labels, whole.labels[index])
    assert len(set(clean.labels.tolist())) == 10
    for split in ("fog/2", "impulse_noise/2"):
        ours, _ = dm.test_sets[split].__getitems__(list(range(40)))
        theirs, _ = full.test_sets[split].__getitems__(index.tolist())
        assert np.array_equal(ours.numpy(), theirs.numpy())  # each image corrupted as in the whole set
    with pytest.raises(Exception, match="test_subset must be >= 1"):
        DigitsDataModule(test_subset=0)


def test_a_limit_covering_few_classes_warns_and_measures_draw_every_class(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=4, eval_batch_size=8,
                           corrupted_test=CorruptedTest(corruptions=[]))
    dm.trainer = SimpleNamespace(limit_val_batches=None, limit_test_batches=1)
    with pytest.warns(UserWarning, match="limit_test_batches 1 covers only 2 of the 10 classes"):
        dm.setup("test")
    batches = training_batches(dm, 20, 8, "cpu")
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert len(labels) == 20 and len(set(labels.tolist())) == 10  # not the first 20: airplanes to bird
