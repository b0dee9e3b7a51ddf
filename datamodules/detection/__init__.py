"""The generic detection data layer, for any source of boxed images (VOC, YOLO folders, synthetic).

- `annotations`: `DetectionRecord` (one image and its boxes), image decoding, the letterbox.
- `augment`: training augmentation (albumentations, bbox-aware).
- `dataset`: `DetectionDataset` serves one image: read (or generate) it in RGB at its native size, optionally
  corrupt it there (the detection robustness protocol: corrupt before resizing, boxes unchanged), letterbox it
  to a square network input, augment training images; `detection_collate` builds ultralytics' batch: `img`
  (uint8 Nx3xSxS; the module scales it), `batch_idx`, `cls` (M, 1), `bboxes` (M, 4) normalised cx, cy, w, h in
  float32, plus what mAP needs: the original boxes (xyxy pixels of the native image), their classes, VOC
  `difficult` flags, and the letterbox (scale, pad).
- `datamodule`: `DetectionDataModule` holds the splits, the 19 x 5 corrupted test splits and the loaders;
  subclasses only say where the records and images come from (`datamodules/voc.py`, `yolo_format.py`,
  `synthetic_boxes.py`).
"""

from datamodules.detection.annotations import (
    MAX_STRIDE,
    PAD_VALUE,
    DetectionRecord,
    ImageDecodeError,
    letterbox,
    read_image,
)
from datamodules.detection.augment import Augmentation
from datamodules.detection.datamodule import DetectionDataModule
from datamodules.detection.dataset import DetectionDataset, detection_collate

__all__ = [
    "MAX_STRIDE",
    "PAD_VALUE",
    "Augmentation",
    "DetectionDataModule",
    "DetectionDataset",
    "DetectionRecord",
    "ImageDecodeError",
    "detection_collate",
    "letterbox",
    "read_image",
]
