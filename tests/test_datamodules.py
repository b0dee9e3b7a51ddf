"""DataModules: the fixed digits split, batched datasets, on-device augmentation, ImageFolder CIFAR."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ArrayImageDataset, CIFAR10DataModule, DataError, DigitsDataModule
from datamodules.base import EpochShuffleSampler, random_crop_flip, resumable_train_sampler, run_seed
from datamodules.cifar import CIFAR10_CLASSES

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


def test_digits_split_is_fixed_and_real():
    first, second = DigitsDataModule(), DigitsDataModule(split_seed=0)
    first.setup("fit")
    second.setup("fit")
    assert (len(first.train_set), len(first.val_set), len(first.test_sets["clean"])) == (1257, 180, 360)
    assert np.array_equal(first.test_sets["clean"].images, second.test_sets["clean"].images)
    images = first.train_set.images
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # grey digits as RGB
    assert set(np.unique(first.test_sets["clean"].labels)) == set(range(10))
    # no image of the test split appears in training
    train = {im.tobytes() for im in first.train_set.images}
    assert not any(im.tobytes() in train for im in first.test_sets["clean"].images[:50])


def test_dataset_serves_whole_batches():
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    dataset = ArrayImageDataset(images, np.arange(5))
    batch, labels = dataset.__getitems__([3, 1])
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == torch.uint8
    assert torch.equal(batch[0], torch.from_numpy(images[3]).permute(2, 0, 1))
    assert labels.tolist() == [3, 1]
    with pytest.raises(DataError, match="uint8 images"):
        ArrayImageDataset(images.astype(np.float32), np.arange(5))


def test_random_crop_flip_translates_and_mirrors():
    torch.manual_seed(0)
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(64, 3, 1, 1)
    out = random_crop_flip(image, padding=1, flip=True)
    assert out.shape == image.shape
    seen = set()
    for sample in out:
        # every output is a shifted (zero-filled) and possibly mirrored window of the input
        candidates = []
        padded = torch.nn.functional.pad(image[0], (1, 1, 1, 1))
        for dy in range(3):
            for dx in range(3):
                window = padded[:, dy:dy + 4, dx:dx + 4]
                candidates += [(dy, dx, False, window), (dy, dx, True, window.flip(2))]
        match = [(dy, dx, f) for dy, dx, f, w in candidates if torch.equal(w, sample)]
        assert match
        seen.update(match)
    assert any(f for _, _, f in seen) and any(not f for _, _, f in seen)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 4


def test_normalisation_happens_on_the_batch_after_transfer():
    dm = DigitsDataModule(augment=False)
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out, labels = dm.on_after_batch_transfer((images, torch.tensor([1, 2])), 0)
    expected = (1.0 - dm.mean[0]) / dm.std[0]
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, expected))


def _write_image_folder(root, per_class: int = 3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cifar_image_folder_layout_loads_and_caches(tmp_path):
    _write_image_folder(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=5)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 30 and len(dm.test_sets["clean"]) == 30
    assert sorted(np.bincount(dm.test_sets["clean"].labels)) == [3] * 10
    assert list((tmp_path / ".qreg-cache").glob("train-*.npy"))
    again = CIFAR10DataModule(root=str(tmp_path), val_size=5)
    again.setup("fit")
    assert np.array_equal(again.test_sets["clean"].images, dm.test_sets["clean"].images)
    # PNG is lossless: the cached pixels are the files' pixels
    first = np.asarray(Image.open(tmp_path / "test" / "airplane" / "0.png"))
    assert np.array_equal(dm.test_sets["clean"].images[0], first)


def test_cifar_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="download: true"):
        CIFAR10DataModule(root=str(tmp_path / "missing"))
    _write_image_folder(tmp_path)
    (tmp_path / "train" / "airplane" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        CIFAR10DataModule(root=str(tmp_path), val_size=5).setup("fit")


def fake_trainer(completed: int, restarting: bool = True, world_size: int = 1, limit=None):
    from types import SimpleNamespace

    progress = SimpleNamespace(current=SimpleNamespace(completed=completed))
    fit_loop = SimpleNamespace(restarting=restarting, epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(fit_loop=fit_loop, world_size=world_size, limit_train_batches=limit, current_epoch=0)


@pytest.mark.parametrize(
    ("trainer", "drop_last", "skipped"),
    [
        (None, True, 0),  # no trainer yet
        (fake_trainer(3), True, 30),  # mid-epoch: 3 of 10 batches done
        (fake_trainer(3, restarting=False), True, 0),  # a fresh run
        (fake_trainer(10), True, 0),  # 105 images, batch 10, drop_last: 10 batches, so the epoch ended
        (fake_trainer(10), False, 100),  # without drop_last the epoch has an 11th, partial batch
        (fake_trainer(3, world_size=2), True, 0),  # DDP restarts the epoch's data
        (fake_trainer(3, limit=3), True, 0),  # limit_train_batches 3: that epoch was complete
    ],
)
def test_resumable_sampler_skips_only_the_batches_a_mid_epoch_checkpoint_trained_on(trainer, drop_last, skipped):
    sampler = resumable_train_sampler(trainer, 105, 10, drop_last=drop_last)
    full = list(EpochShuffleSampler(105, seed=run_seed()))  # the seed seed_everything left, if any
    assert list(sampler) == full[skipped:]
    assert list(sampler) == full  # the skip applies to the resumed epoch only


def test_a_mid_epoch_resume_under_ddp_says_its_epoch_restarts_and_an_exact_one_says_nothing():
    with pytest.warns(UserWarning, match="resuming mid-epoch under DDP: epoch 0's data starts again"):
        resumable_train_sampler(fake_trainer(2, world_size=2), 210, 10, drop_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumable_train_sampler(fake_trainer(3), 105, 10, drop_last=True)  # exact on one process: no warning
        resumable_train_sampler(fake_trainer(10, world_size=2), 210, 10, drop_last=True)  # its epoch had ended
