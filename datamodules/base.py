"""In-memory 32x32 image classification with augmentation and normalisation done on the batch, on device.

Datasets hold uint8 HxWx3 arrays and serve whole batches (`__getitems__`), so a DataLoader step is one numpy
fancy-index instead of 128 per-sample transforms; random crop, flip and normalisation then run once per
batch on the accelerator (the airbench recipe). Corrupted test splits reuse the same batched path.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.corruptions.splits import (
    CIFARCRelease,
    CorruptedTest,
    CorruptionCache,
    OnTheFlyCorruption,
)
from datamodules.errors import DataError
from datamodules.subsets import classes_covered, stratified_indices
from records.splits import CLEAN, split_name

# Maps (uint8 NxHxWx3 images, their dataset indices) to images of the same shape: e.g. a corruption.
BatchTransform = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ArrayImageDataset(Dataset):
    """uint8 NxHxWx3 images and integer labels; batches come out as (uint8 Nx3xHxW, int64 N)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: BatchTransform | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resident(self) -> bool:
        """Whether batches are indexed from a copy on the accelerator (`to_device`)."""
        return self._resident is not None

    def to_device(self, device: torch.device) -> None:
        """Keep a copy of the uint8 images and the labels on `device` and serve batches by indexing there.

        The numpy arrays stay as they are (the corrupted splits are made from them). Only for sets without a
        host-side transform: an on-the-fly corruption needs the numpy images.
        """
        if self.transform is not None:
            raise DataError("a set corrupted on the fly cannot be device-resident (cache its splits instead)")
        # torch.tensor copies (cached splits are read-only memory maps, which torch.from_numpy would share)
        self._resident = (torch.tensor(self.images, device=device), torch.tensor(self.labels, device=device))

    def _getitems_resident(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._resident
        index = torch.as_tensor(indices, dtype=torch.int64)
        if images.device.type == "cuda":
            index = index.pin_memory().to(images.device, non_blocking=True)
        # the same NHWC -> NCHW view as the host path, so both serve identical (and identically strided) batches
        return images[index].permute(0, 3, 1, 2), labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resident:
            return self._getitems_resident(indices)
        indices = np.asarray(indices, dtype=np.int64)
        images = self.images[indices]
        if self.transform is not None:
            images = self.transform(images, indices)
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), torch.from_numpy(
            self.labels[indices]
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


class _IndexMapped:
    """A batch transform applied to a subset: the transform sees each image's index in the full set (a
    corruption's per-image seed), not its position in the subset."""

    def __init__(self, transform: BatchTransform, indices: np.ndarray) -> None:
        self.transform, self.indices = transform, indices

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.transform(images, self.indices[indices])


def subset_of(dataset: ArrayImageDataset, indices: np.ndarray) -> ArrayImageDataset:
    """The images at `indices` (a memory-mapped cache is read for those only)."""
    transform = _IndexMapped(dataset.transform, indices) if dataset.transform is not None else None
    return ArrayImageDataset(np.asarray(dataset.images[indices]), dataset.labels[indices], transform)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch, a function of (seed, epoch) only, that can resume mid-epoch.

    The order does not depend on the global RNG, so a run resumed from a checkpoint sees exactly the batches
    an uninterrupted run would: `resume_at(n)` drops the first n indices of the next epoch's permutation
    once (the ones the interrupted run already trained on). Lightning calls `set_epoch` every epoch.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch, self._skip = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed)).tolist()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.size


# Lightning warns on every mid-epoch resume unless the DataLoader itself is stateful; on one process ours resume
# exactly through EpochShuffleSampler (positioned from the restored batch progress, resumable_train_sampler), so
# the warning is wrong there; under DDP, where the epoch's data does restart, qreg says so itself (below).
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


def run_seed() -> int:
    """The seed Lightning's seed_everything set (PL_GLOBAL_SEED), 0 without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def loader_generator() -> torch.Generator:
    """A DataLoader's own generator. Every DataLoader iterator draws a worker seed from its generator, which
    defaults to the global RNG: a resumed run creates iterators an uninterrupted one does not (the sanity
    check), so each loader gets its own and the global RNG is left to the augmentation alone."""
    return torch.Generator().manual_seed(run_seed())


def resumable_train_sampler(trainer, size: int, batch_size: int, drop_last: bool) -> EpochShuffleSampler:
    """The training sampler, positioned after the batches of the current epoch that a mid-epoch checkpoint
    already trained on (none for a fresh run or an end-of-epoch checkpoint)."""
    sampler = EpochShuffleSampler(size, seed=run_seed())
    sampler.resume_at(_completed_batches_in_epoch(trainer, size, batch_size, drop_last) * batch_size)
    return sampler


def _completed_batches_in_epoch(trainer, size: int, batch_size: int, drop_last: bool) -> int:
    if trainer is None or not trainer.fit_loop.restarting:
        return 0
    per_epoch = batches_per_epoch(size // trainer.world_size, batch_size, drop_last, trainer.limit_train_batches)
    completed = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    if not 0 < completed < per_epoch:  # an end-of-epoch checkpoint starts a new epoch
        return 0
    if trainer.world_size > 1:
        # The distributed sampler splits our order across ranks: a mid-epoch resume restarts the epoch's data.
        rank_zero_warn(f"resuming mid-epoch under DDP: epoch {trainer.current_epoch}'s data starts again from its "
                       f"first batch ({completed} batches of it were trained before the stop); the weights, the "
                       "epoch count and the learning-rate schedule are exact, the data order of this epoch is not")
        return 0
    return completed


def batches_per_epoch(images: int, batch_size: int, drop_last: bool, limit: int | float | None = None) -> int:
    """The training batches one epoch of `images` gives, after Lightning's `limit_train_batches` (a count, or a
    fraction of the epoch)."""
    batches = images // batch_size if drop_last else math.ceil(images / batch_size)
    if limit is None or isinstance(limit, bool):
        return batches
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def fill_corruption_cache(cache: CorruptionCache, splits, workers: int, what: str) -> int:
    """Generate the splits the cache lacks, `workers` processes at a time, behind a progress bar; returns how
    many were written."""
    todo = cache.missing(splits)
    with progress_bar(disable=not todo) as progress:
        task = progress.add_task(f"corrupting {what}", total=len(todo))
        cache.generate(todo, workers=workers, progress=lambda *_: progress.advance(task))
    return len(todo)


def progress_bar(disable: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=disable)


def keep_batch(batch):
    """collate_fn for datasets whose `__getitems__` already returns a collated batch."""
    return batch


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Per-image random translation by up to `padding` pixels (zero padded) and horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1) + dy
    cols = torch.arange(w, device=images.device).view(1, 1, w) + dx
    if flip:
        mirrored = torch.rand(n, 1, 1, device=images.device) < 0.5
        cols = torch.where(mirrored, cols.flip(2), cols)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class ImageClassificationDataModule(L.LightningDataModule):
    """Base for the classification DataModules: splits, loaders and on-device batch preprocessing.

    Subclasses implement `load()` returning uint8 (train_images, train_labels, test_images, test_labels)
    and set `name`, `num_classes`, `class_names` and the normalisation statistics.
    """

    name: str = "images"
    num_classes: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    flip: bool = True
    # Size of the full training set, when fixed, so a bad val_size fails before any Trainer is built.
    train_size: int | None = None

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        crop_padding: int = 4,
        augment: bool = True,
        corrupted_test: CorruptedTest = CorruptedTest(),  # noqa: B008 (frozen, safe to share)
        device_resident: bool = False,
        test_subset: int | None = None,
        val_subset: int | None = None,
    ) -> None:
        """
        Args:
            batch_size: training batch size.
            eval_batch_size: validation and test batch size.
            num_workers: DataLoader worker processes (0 loads in the main process).
            val_size: images held out of the training set for validation.
            split_seed: fixes which images are held out, independently of the run's seed.
            crop_padding: random-crop translation in pixels (zero padded); 0 disables it.
            augment: random crop (and flip, where the dataset allows) on training batches.
            corrupted_test: corrupted copies of the test set served after the clean one: by default all
                19 corruptions x 5 severities of the cifar profile, generated on the fly; `corruptions: []`
                serves the clean test set only.
            device_resident: keep the uint8 train, val and test images (and cached or released corrupted
                splits) on the accelerator and index batches there, in the same (seed, epoch) order; splits
                corrupted on the fly stay on the host. Off, batches are copied from pinned host memory.
            test_subset: evaluate on this many test images, drawn class-stratified under split_seed, the same
                images in the clean and in every corrupted split (null: the whole test set). Prefer it to
                `limit_test_batches`, which takes the first batches of a set that may be ordered by class.
            val_subset: the same for the validation split.
        """
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if val_size < 1:
            raise DataError(f"data.val_size must be >= 1, got {val_size}")
        if self.train_size is not None and val_size >= self.train_size:
            raise DataError(f"data.val_size {val_size} leaves no training images (of {self.train_size})")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.crop_padding = crop_padding
        self.augment = augment
        self.corrupted_test = corrupted_test
        self.device_resident = device_resident
        for name, value in (("test_subset", test_subset), ("val_subset", val_subset)):
            if value is not None and value < 1:
                raise DataError(f"data.init_args.{name} must be >= 1 images (or null for all), got {value}")
        self.test_subset = test_subset
        self.val_subset = val_subset
        self._test_subset_indices: np.ndarray | None = None
        self.train_set: ArrayImageDataset | None = None
        self.val_set: ArrayImageDataset | None = None
        self.test_sets: dict[str, ArrayImageDataset] = {}

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._split()
        if stage in (None, "test") and len(self.test_sets) == 1:
            corrupted = self._corrupted_test_sets()
            if self._test_subset_indices is not None:  # the clean subset's images, corrupted
                corrupted = {name: subset_of(ds, self._test_subset_indices) for name, ds in corrupted.items()}
            self.test_sets.update(corrupted)
        self._warn_if_limits_skip_classes()
        if self.device_resident:
            self._move_to_device()

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _move_to_device(self) -> None:
        device = self._device()
        for dataset in (self.train_set, self.val_set, *self.test_sets.values()):
            if dataset is not None and dataset.transform is None and not dataset.resident:
                dataset.to_device(device)

    def _warn_if_limits_skip_classes(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        for option, dataset in (("limit_val_batches", self.val_set), ("limit_test_batches",
                                                                       self.test_sets.get("clean"))):
            limit = getattr(trainer, option, None)
            if dataset is None or limit is None or isinstance(limit, bool) or limit == 0:
                continue
            batches = math.ceil(len(dataset) / self.eval_batch_size)
            used = min(limit, batches) if isinstance(limit, int) else int(batches * limit)
            covered = classes_covered(dataset.labels, used * self.eval_batch_size)
            present = len(np.unique(dataset.labels))
            if covered < present:
                subset = "val_subset" if option == "limit_val_batches" else "test_subset"
                warnings.warn(f"--trainer.{option} {limit} covers only {covered} of the {present} classes of "
                              f"the {self.name} {subset.split('_')[0]} set (its first images); use "
                              f"--data.init_args.{subset} <images> for a class-stratified subset", stacklevel=2)

    def _split(self) -> None:
        train_images, train_labels, test_images, test_labels = self.load()
        if self.val_size >= len(train_images):
            raise DataError(f"data.val_size {self.val_size} leaves no training images (of {len(train_images)})")
        # The validation split is fixed by split_seed, not by the run's seed: every run of a study is
        # validated on the same images.
        order = np.random.default_rng(self.split_seed).permutation(len(train_images))
        val_idx, train_idx = np.sort(order[: self.val_size]), np.sort(order[self.val_size :])
        self.train_set = ArrayImageDataset(train_images[train_idx], train_labels[train_idx])
        self.val_set = ArrayImageDataset(train_images[val_idx], train_labels[val_idx])
        if self.val_subset is not None:
            self.val_set = subset_of(self.val_set, stratified_indices(self.val_set.labels, self.val_subset,
                                                                      self.split_seed))
        self._clean_test_set = ArrayImageDataset(test_images, test_labels)
        self.test_sets = {CLEAN: self._clean_test_set}
        if self.test_subset is not None:
            self._test_subset_indices = stratified_indices(test_labels, self.test_subset, self.split_seed)
            self.test_sets[CLEAN] = subset_of(self._clean_test_set, self._test_subset_indices)

    def _corrupted_test_sets(self) -> dict[str, ArrayImageDataset]:
        settings = self.corrupted_test
        # The whole clean set: corruption seeds, caches and the official release are indexed by it.
        clean = getattr(self, "_clean_test_set", None) or self.test_sets[CLEAN]
        splits = settings.splits()
        if not splits:
            return {}
        if settings.release_root:
            release = CIFARCRelease(settings.release_root, clean.labels, settings.verify_md5)
            return {split_name(c, s): ArrayImageDataset(release.images(c, s), clean.labels) for c, s in splits}
        if settings.cache_dir:
            cache = CorruptionCache(settings.cache_dir, clean.images, settings.profile, settings.seed)
            fill_corruption_cache(cache, splits, settings.workers, f"the {self.name} test set")
            loaded = {split_name(c, s): ArrayImageDataset(cache.load(c, s), clean.labels) for c, s in splits}
            return loaded
        return {
            split_name(c, s): ArrayImageDataset(
                clean.images, clean.labels, OnTheFlyCorruption(c, s, settings.profile, settings.seed)
            )
            for c, s in splits
        }

    @property
    def test_split_names(self) -> list[str]:
        """Names of the test dataloaders, in dataloader_idx order."""
        return list(self.test_sets) or [CLEAN]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False,
                sampler: Sampler | None = None) -> DataLoader:
        resident = getattr(dataset, "resident", False)
        # device-resident batches are indexed in the main process; host batches go to a GPU from pinned
        # memory, which Lightning's transfer then copies without blocking
        workers = 0 if resident else self.num_workers
        pin = not resident and self._device().type == "cuda"
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=keep_batch,
            sampler=sampler, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin,
            generator=loader_generator(),
        )

    def train_dataloader(self) -> DataLoader:
        sampler = resumable_train_sampler(getattr(self, "trainer", None), len(self.train_set), self.batch_size,
                                          drop_last=True)
        return self._loader(self.train_set, self.batch_size, shuffle=False, drop_last=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(ds, self.eval_batch_size, shuffle=False) for ds in self.test_sets.values()]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_sets[CLEAN], self.eval_batch_size, shuffle=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 Nx3xHxW -> normalised float."""
        mean, std = self._normalization_on(images.device)
        return (images.float() / 255.0 - mean) / std

    def _normalization_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a tensor built from Python numbers on every batch is a blocking
        # host-to-device copy, a stream sync per batch on CUDA.
        cache = self.__dict__.setdefault("_normalization", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                             torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        return cache[device]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images, self.crop_padding, self.flip)
        return self.normalize(images), labels
