"""Synthetic detection data that a YOLO model learns in seconds on CPU: coloured rectangles on noise.

Each image (128 px by default) holds 1-3 filled rectangles whose colour is the class (red, green, blue), on a
background of dim uniform noise. Generated in memory from a seed (train, val and test from different
seeds), so the tests need no files; the real pipeline (letterbox, augmentation, corruption, collate) is the
same as for VOC.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from datamodules.corruptions.splits import CorruptedTest
from datamodules.detection import Augmentation, DetectionDataModule, DetectionRecord
from datamodules.errors import DataError

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}


def rectangles(count: int, size: int, seed: int, max_objects: int = 3) -> tuple[np.ndarray, list[DetectionRecord]]:
    """`count` uint8 size x size RGB images and their records (boxes in pixels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, size=(count, size, size, 3), dtype=np.uint8)
    colours = np.array(list(COLOURS.values()), dtype=np.int16)
    records = []
    for i in range(count):
        boxes, classes = [], []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            w, h = rng.integers(size // 6, size // 2, size=2)
            x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            cls = int(rng.integers(0, len(colours)))
            jitter = rng.integers(-20, 21, size=3)
            images[i, y1 : y1 + h, x1 : x1 + w] = np.clip(colours[cls] + jitter, 0, 255).astype(np.uint8)
            boxes.append((x1, y1, x1 + w, y1 + h))
            classes.append(cls)
        # Later rectangles may hide earlier ones: keep the objects that are still mostly visible.
        visible = _visible_objects(boxes)
        records.append(DetectionRecord(
            i, np.asarray(boxes, np.float32)[visible], np.asarray(classes, np.int64)[visible],
            np.zeros(int(visible.sum()), bool),
        ))
    return images, records


def _visible_objects(boxes: list[tuple[int, int, int, int]], min_visible: float = 0.6) -> np.ndarray:
    keep = []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        mask = np.ones((y2 - y1, x2 - x1), bool)
        for a1, b1, a2, b2 in boxes[i + 1 :]:
            mask[max(b1 - y1, 0) : max(b2 - y1, 0), max(a1 - x1, 0) : max(a2 - x1, 0)] = False
        keep.append(mask.mean() >= min_visible)
    return np.asarray(keep, bool)


class RectanglesDataModule(DetectionDataModule):
    """Coloured rectangles (3 classes) on noise; for tests and smoke runs.

    Args:
        train_size, val_size, test_size: images per split.
        source_size: side of the generated images (they are then letterboxed to image_size).
        seed: generates the splits (train from seed, val from seed + 1, test from seed + 2).
        (the rest: see DetectionDataModule)
    """

    name = "rectangles"

    def __init__(
        self,
        train_size: int = 128,
        val_size: int = 32,
        test_size: int = 64,
        source_size: int = 128,
        seed: int = 0,
        image_size: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = True,
        augmentation: Augmentation = Augmentation(),  # noqa: B008 (frozen, safe to share)
        on_bad_image: Literal["error", "skip"] = "error",
        corrupted_test: CorruptedTest = CorruptedTest(profile="imagenet"),  # noqa: B008
    ) -> None:
        super().__init__(
            list(COLOURS), image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, augment=augment, augmentation=augmentation, on_bad_image=on_bad_image,
            corrupted_test=corrupted_test,
        )
        if min(train_size, val_size, test_size) < 1:
            raise DataError(f"split sizes must be >= 1, got {train_size}, {val_size}, {test_size}")
        if source_size < 16:
            raise DataError(f"data.source_size must be >= 16, got {source_size}")
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.source_size = source_size
        self.seed = seed
        self._images: dict[str, np.ndarray] = {}

    def load_records(self) -> dict[str, list[DetectionRecord]]:
        records = {}
        for offset, (split, count) in enumerate(self.sizes.items()):
            images, split_records = rectangles(count, self.source_size, self.seed + offset)
            self._images[split] = images
            # The record's image is (split, index): one loader serves all three splits.
            records[split] = [
                DetectionRecord((split, r.image), r.boxes, r.classes, r.difficult) for r in split_records
            ]
        return records

    def load_image(self, image: Any) -> np.ndarray:
        split, index = image
        return self._images[split][index]
