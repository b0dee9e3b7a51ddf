"""`DetectionDataModule`: the train/val/test detection splits, the corrupted test splits and their loaders."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import loader_generator, resumable_train_sampler
from datamodules.corruptions.splits import CorruptedTest
from datamodules.detection.annotations import MAX_STRIDE, DetectionRecord, read_image
from datamodules.detection.augment import Augmentation
from datamodules.detection.dataset import DetectionDataset, detection_collate
from datamodules.errors import DataError
from records.splits import CLEAN, split_name

log = logging.getLogger(__name__)


def refuse_unscorable(split: str, records: Sequence[DetectionRecord]) -> None:
    """A split scored by mAP needs a ground-truth object: without one COCO evaluation returns -1 ("undefined"),
    which must not end up as a -100 % result. Refused before training rather than after it."""
    if not any((~np.asarray(r.difficult, dtype=bool)).any() for r in records):
        raise DataError(f"the {split} set ({len(records)} images) has no labelled objects (none, or only difficult "
                        f"ones), so its mAP is undefined: check its label files or data.{split}_sets")


class DetectionDataModule(L.LightningDataModule):
    """Train/val/test detection splits, corrupted test splits and their loaders.

    Subclasses implement `load_records()` returning {"train": [...], "val": [...], "test": [...]} and may
    override `load_image` (in-memory data). `num_classes` and `class_names` must be known after __init__
    (the CLI links `data.num_classes` to the model).
    """

    name: str = "detection"

    def __init__(
        self,
        class_names: Sequence[str] | int,
        image_size: int = 640,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = True,
        augmentation: Augmentation = Augmentation(),  # noqa: B008 (frozen, safe to share)
        train_difficult: bool = False,
        on_bad_image: Literal["error", "skip"] = "error",
        corrupted_test: CorruptedTest = CorruptedTest(profile="imagenet"),  # noqa: B008 (frozen, safe to share)
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < MAX_STRIDE or image_size % MAX_STRIDE:
            raise DataError(f"data.image_size must be a positive multiple of {MAX_STRIDE}, got {image_size!r}")
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if corrupted_test.release_root:
            raise DataError("corrupted_test.release_root is for the CIFAR-C release; detection corrupts on the fly")
        if isinstance(class_names, int) and not isinstance(class_names, bool):
            class_names = [f"class{i}" for i in range(class_names)]
        self.class_names = [str(name) for name in class_names]
        self.num_classes = len(self.class_names)
        if not self.num_classes or len(set(self.class_names)) != self.num_classes:
            raise DataError(f"data.class_names must be distinct names (or a class count), got {class_names!r}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.augmentation = augmentation
        self.train_difficult = train_difficult
        self.on_bad_image = on_bad_image
        self.corrupted_test = corrupted_test
        self.train_set: DetectionDataset | None = None
        self.val_set: DetectionDataset | None = None
        self.test_sets: dict[str, DetectionDataset] = {}

    def load_records(self) -> dict[str, list[DetectionRecord]]:
        raise NotImplementedError

    def load_image(self, image: Any) -> np.ndarray:
        return read_image(str(image))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            records = self.load_records()
            if stage != "predict":
                for split in ("val", "test"):
                    refuse_unscorable(split, records[split])
            train = records["train"] if self.train_difficult else [r.without_difficult() for r in records["train"]]
            augmentation = self.augmentation if self.augment else None
            self.train_set = DetectionDataset(train, self.image_size, self.load_image, augmentation,
                                              on_bad_image=self.on_bad_image)
            self.val_set = DetectionDataset(records["val"], self.image_size, self.load_image,
                                            on_bad_image=self.on_bad_image, evaluation=True)
            self.test_sets = {CLEAN: DetectionDataset(records["test"], self.image_size, self.load_image,
                                                        on_bad_image=self.on_bad_image, evaluation=True)}
        if stage in (None, "test") and len(self.test_sets) == 1:
            settings = self.corrupted_test
            if settings.cache_dir and settings.splits():
                log.info("detection test images are corrupted on the fly; corrupted_test.cache_dir is not used")
            clean = self.test_sets[CLEAN]
            for corruption, severity in settings.splits():
                self.test_sets[split_name(corruption, severity)] = clean.with_corruption(
                    corruption, severity, settings.profile, settings.seed
                )

    def set_epoch(self, epoch: int, max_epochs: int | None) -> None:
        """Called by the task module at each training epoch's start: mosaic off for the last close_mosaic epochs."""
        if self.train_set is not None and self.train_set.augmentation is not None:
            on = self.train_set.augmentation.mosaic_in(epoch, max_epochs)
            if self.train_set.mosaic_active and not on:
                log.info("mosaic off for the last %d epochs", self.train_set.augmentation.close_mosaic)
            self.train_set.set_mosaic(on)

    @property
    def test_split_names(self) -> list[str]:
        """Names of the test dataloaders, in dataloader_idx order."""
        return list(self.test_sets) or [CLEAN]

    def _loader(self, dataset: Dataset, batch_size: int, workers: int, persistent: bool,
                sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=detection_collate, num_workers=workers,
            persistent_workers=persistent and workers > 0, drop_last=False, generator=loader_generator(),
        )

    def train_dataloader(self) -> DataLoader:
        # A mid-epoch resume replays the epoch's order exactly, not its augmentation draws.
        sampler = resumable_train_sampler(getattr(self, "trainer", None), len(self.train_set), self.batch_size,
                                          drop_last=False)
        return self._loader(self.train_set, self.batch_size, self.num_workers, True, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, self.num_workers, True)

    def test_dataloader(self) -> list[DataLoader]:
        # Corrupting full-size images is CPU work: corrupted_test.workers adds processes for those splits.
        # Not persistent: 96 loaders would otherwise each keep their workers alive.
        workers = max(self.num_workers, self.corrupted_test.workers if len(self.test_sets) > 1 else 0)
        return [self._loader(ds, self.eval_batch_size, workers, False) for ds in self.test_sets.values()]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_sets[CLEAN], self.eval_batch_size, self.num_workers, False)

