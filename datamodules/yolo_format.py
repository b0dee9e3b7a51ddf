"""YOLO-format detection data (`images/<set>/*.jpg`, `labels/<set>/*.txt` with `class cx cy w h` normalised):
label parsing, the records of one image folder, class names from an ultralytics data YAML."""

from __future__ import annotations

import warnings
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
    for number, line in enumerate(read_utf8(path, "label file").splitlines(), start=1):
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


def read_utf8(path: Path, what: str) -> str:
    """A text file's content; one that is not UTF-8 is a DataError naming it, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def image_files(images: Path) -> list[Path]:
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
    return files


def check_yolo_labels(root: Path, set_name: str) -> None:
    """Refuse a set none of whose images has a label file (trained, it would learn that nothing is ever there
    and score an undefined mAP); warn once with the count when only some lack one: YOLO reads an image
    without a label file as a background image, which is legitimate but also what a misplaced file looks like."""
    images, labels = root / "images" / set_name, root / "labels" / set_name
    files = image_files(images)
    unlabelled = sum(not (labels / f"{file.stem}.txt").is_file() for file in files)
    if unlabelled == len(files):
        raise DataError(f"none of the {len(files)} images in {images} has a label file: expected "
                        f"{labels}/<image name>.txt (YOLO layout: labels/<set> beside images/<set>)")
    if unlabelled:
        warnings.warn(f"{unlabelled} of the {len(files)} images in {images} have no label file in {labels}: "
                      "they are read as background images (no objects)", stacklevel=2)


def yolo_records(root: Path, set_name: str, num_classes: int) -> list[DetectionRecord]:
    """The images of `<root>/images/<set_name>` with the boxes of their `<root>/labels/<set_name>/*.txt`."""
    labels = root / "labels" / set_name
    files = image_files(root / "images" / set_name)
    records = []
    for file in files:
        boxes, classes = parse_yolo_labels(labels / f"{file.stem}.txt", num_classes)
        records.append(DetectionRecord(str(file), boxes, classes, np.zeros(len(classes), bool), normalized=True))
    return records


def class_names_from_data_yaml(path: str | Path) -> list[str]:
    """The class names of an ultralytics data YAML (`names:` as a list, or a mapping index -> name)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"class names file not found: {file} (data.class_names: a list, a count, or a data YAML)")
    try:
        names = (yaml.safe_load(read_utf8(file, "class names file")) or {}).get("names")
    except (yaml.YAMLError, AttributeError) as error:
        raise DataError(f"cannot read class names from {file}: {str(error).splitlines()[0]}") from None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{file}: names must be indexed 0..{len(names) - 1}, got {sorted(names)[:5]}...")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{file} has no 'names:' list or mapping (an ultralytics data YAML)")
    return [str(name) for name in names]
