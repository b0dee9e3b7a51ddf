"""YOLO-format detection data (`images/<set>/*.jpg`, `labels/<set>/*.txt` with `class cx cy w h` normalised):
label parsing, the records of one image folder, class names from an ultralytics data YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.detection import DetectionRecord
from datamodules.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def parse_yolo_labels(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cx, cy, w, h boxes and classes of one YOLO label file (a missing file: no objects)."""
    if not path.exists():
        return np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(f) for f in fields[:5]]
        except ValueError:
            values = []
        if len(values) != 5 or len(fields) != 5:
            raise DataError(f"{path}:{number}: expected 'class cx cy w h', got {line.strip()!r}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DataError(
                f"{path}:{number}: class {fields[0]} is out of range for {num_classes} classes "
                f"(0..{num_classes - 1}); fix the label or data.class_names"
            )
        if not all(0 <= v <= 1 for v in values[1:]):
            raise DataError(f"{path}:{number}: box values must be normalised to 0..1, got {' '.join(fields[1:])}")
        rows.append(values)
    array = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
    return array[:, 1:5], array[:, 0].astype(np.int64)


def yolo_records(root: Path, set_name: str, num_classes: int) -> list[DetectionRecord]:
    """The images of `<root>/images/<set_name>` with the boxes of their `<root>/labels/<set_name>/*.txt`."""
    images = root / "images" / set_name
    labels = root / "labels" / set_name
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    records = []
    for file in files:
        boxes, classes = parse_yolo_labels(labels / f"{file.stem}.txt", num_classes)
        records.append(DetectionRecord(str(file), boxes, classes, np.zeros(len(classes), bool), normalized=True))
    return records
