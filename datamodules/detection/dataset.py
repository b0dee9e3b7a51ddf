"""`DetectionDataset` (records -> letterboxed, optionally corrupted or augmented samples) and the collate
that builds ultralytics' batch format."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.corruptions.engine import corrupt
from datamodules.detection.annotations import DetectionRecord, ImageDecodeError, letterbox, read_image
from datamodules.detection.augment import MOSAIC_KEY, Augmentation
from datamodules.errors import DataError

log = logging.getLogger(__name__)


class DetectionDataset(Dataset):
    """Records -> letterboxed samples; optionally corrupted at native resolution or augmented.

    Args:
        records: the images and their objects.
        image_size: side of the square network input.
        load: maps a record's `image` to uint8 HxWx3 RGB (default: read the file).
        augmentation: training augmentation, or None.
        corruption: (name, severity, profile, seed) applied to the native image before the letterbox; image i
            is corrupted with `corrupt(..., index=i)`, so the result depends only on (seed, i).
        on_bad_image: "error" raises on an image that does not decode; "skip" logs a warning naming it and
            leaves it out: a training set serves the next image in its place (the batch keeps its size), an
            evaluation set serves None, which `detection_collate` drops, so the image and its boxes leave the
            evaluation instead of another image being scored twice.
        evaluation: the set is scored (validation, test, corrupted test) rather than trained on.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        image_size: int,
        load: Callable[[Any], np.ndarray] | None = None,
        augmentation: Augmentation | None = None,
        corruption: tuple[str, int, str, int] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        evaluation: bool = False,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.load = load or read_image
        self.augmentation = augmentation
        self.corruption = corruption
        self.on_bad_image = on_bad_image
        self.evaluation = evaluation
        self._transform = None
        self._transform_key: tuple[int, bool] | None = None
        # Shared with DataLoader workers (also persistent ones): the DataModule switches mosaic off for the
        # last epochs from the main process.
        self._mosaic_on = torch.ones(1, dtype=torch.uint8).share_memory_()

    def set_mosaic(self, on: bool) -> None:
        self._mosaic_on.fill_(int(on))

    @property
    def mosaic_active(self) -> bool:
        return self.augmentation is not None and self.augmentation.mosaic > 0 and bool(self._mosaic_on.item())

    def __len__(self) -> int:
        return len(self.records)

    def with_corruption(self, name: str, severity: int, profile: str, seed: int) -> DetectionDataset:
        return DetectionDataset(self.records, self.image_size, self.load, None, (name, severity, profile, seed),
                                self.on_bad_image, evaluation=True)

    def _augment(self, image, boxes, classes):
        # One albumentations pipeline per process, seeded from torch's seed: a DataLoader worker's seed
        # changes every epoch and follows seed_everything, so augmentation is reproducible.
        seed = torch.initial_seed() % 2**32
        mosaic = self.mosaic_active
        if self._transform is None or self._transform_key != (seed, mosaic):
            self._transform = self.augmentation.build(seed, self.image_size, mosaic)
            self._transform_key = (seed, mosaic)
        extra = {MOSAIC_KEY: self._mosaic_partners()} if mosaic else {}
        out = self._transform(image=image, bboxes=boxes, classes=classes, **extra)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return out["image"], boxes, np.asarray(out["classes"], dtype=np.int64).reshape(-1)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        for attempt in range(len(self.records)):
            try:
                return self._sample((index + attempt) % len(self.records))
            except ImageDecodeError as error:
                if self.on_bad_image == "error":
                    raise
                log.warning("skipping %s", error)
                if self.evaluation:
                    return None
        raise DataError("no image of the dataset decodes")

    def _mosaic_partners(self) -> list[dict[str, Any]]:
        """3 other training images, letterboxed, with their boxes (the torch generator picks them)."""
        partners = []
        for other in torch.randint(len(self.records), (3,)).tolist():
            try:
                image, boxes, classes = self._letterboxed(other)[:3]
            except ImageDecodeError as error:  # the mosaic repeats the primary image in that cell
                if self.on_bad_image == "error":
                    raise
                log.warning("skipping %s", error)
                continue
            partners.append({"image": image, "bboxes": boxes, "classes": classes})
        return partners

    def _letterboxed(self, index: int):
        """The network-input image of record `index`, its boxes there (pascal_voc pixels, empty ones dropped)
        and classes, plus the native boxes, the letterbox and the native shape."""
        record = self.records[index]
        image = self.load(record.image)
        height, width = image.shape[:2]
        boxes = record.boxes.astype(np.float32).reshape(-1, 4)
        if record.normalized:  # YOLO cx, cy, w, h in 0..1 -> native pixels
            cx, cy, w, h = boxes.T
            boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                              (cy + h / 2) * height], axis=1).astype(np.float32)
        native_boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        if self.corruption is not None:
            name, severity, profile, seed = self.corruption
            image = corrupt(np.ascontiguousarray(image), name, severity, profile, seed, index=index)
        net_image, scale, (left, top) = letterbox(image, self.image_size)
        net_boxes = native_boxes * scale + np.array([left, top, left, top], dtype=np.float32)
        keep = (net_boxes[:, 2] > net_boxes[:, 0]) & (net_boxes[:, 3] > net_boxes[:, 1])
        return net_image, net_boxes[keep], record.classes[keep], native_boxes, (scale, left, top), (height, width)

    def _sample(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        net_image, net_boxes, classes, native_boxes, (scale, left, top), (height, width) = self._letterboxed(index)
        if self.augmentation is not None:
            net_image, net_boxes, classes = self._augment(net_image, net_boxes, classes)
        size = float(self.image_size)
        xyxy = net_boxes / size
        normalized = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                               xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], axis=1).astype(np.float32)
        return {
            "img": torch.from_numpy(np.ascontiguousarray(net_image)).permute(2, 0, 1),
            "cls": torch.from_numpy(np.asarray(classes, dtype=np.int64)),
            "bboxes": torch.from_numpy(normalized.reshape(-1, 4)),
            "ori_boxes": torch.from_numpy(native_boxes),
            "ori_cls": torch.from_numpy(record.classes.astype(np.int64)),
            "difficult": torch.from_numpy(record.difficult.astype(bool)),
            "ratio_pad": torch.tensor([scale, left, top], dtype=torch.float32),
            "ori_shape": torch.tensor([height, width], dtype=torch.int64),
            "index": index,
        }


def detection_collate(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """ultralytics' batch format plus the per-image ground truth that mAP needs.

    None samples (images an evaluation set skipped) are left out; a batch of only those has 0 images.
    """
    samples = [s for s in samples if s is not None]
    counts = [len(s["cls"]) for s in samples]
    if not samples:
        return {"img": torch.zeros(0, 3, 0, 0, dtype=torch.uint8), "batch_idx": torch.zeros(0),
                "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4), "ori_boxes": [], "ori_cls": [],
                "difficult": [], "ratio_pad": torch.zeros(0, 3), "ori_shape": torch.zeros(0, 2, dtype=torch.int64),
                "index": torch.zeros(0, dtype=torch.int64)}
    return {
        "img": torch.stack([s["img"] for s in samples]),
        "batch_idx": torch.cat([torch.full((n,), i, dtype=torch.float32) for i, n in enumerate(counts)]),
        "cls": torch.cat([s["cls"] for s in samples]).float().view(-1, 1),
        "bboxes": torch.cat([s["bboxes"] for s in samples]).float().view(-1, 4),
        "ori_boxes": [s["ori_boxes"] for s in samples],
        "ori_cls": [s["ori_cls"] for s in samples],
        "difficult": [s["difficult"] for s in samples],
        "ratio_pad": torch.stack([s["ratio_pad"] for s in samples]),
        "ori_shape": torch.stack([s["ori_shape"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }
