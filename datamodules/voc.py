"""Object detection data: Pascal VOC (VOCdevkit XML or YOLO txt layout), letterboxed, in ultralytics' batch format.

- `DetectionDataset` serves one image: read (or generate) it in RGB at its native size, optionally corrupt
  it there (the detection robustness protocol: corrupt before resizing, boxes unchanged), letterbox it to a
  square network input, and augment training images with albumentations (affine scale/translate, flip, HSV).
- `detection_collate` builds ultralytics' batch: `img` (uint8 Nx3xSxS; the module scales it), `batch_idx`,
  `cls` (M, 1), `bboxes` (M, 4) normalised cx, cy, w, h in float32, plus what mAP needs: the original boxes
  (xyxy pixels of the native image), their classes, VOC `difficult` flags, and the letterbox (scale, pad).
- `DetectionDataModule` holds the train/val/test splits, the 19 x 5 corrupted test splits and the loaders;
  `VOCDataModule` reads Pascal VOC from disk. Synthetic data for tests: `datamodules/synthetic_boxes.py`.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import loader_generator, resumable_train_sampler
from datamodules.corruptions.engine import corrupt
from datamodules.corruptions.splits import CorruptedTest, split_name
from datamodules.errors import DataError

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PAD_VALUE = 114  # ultralytics' letterbox grey
MAX_STRIDE = 32  # YOLOv5's largest stride: the input side must be a multiple of it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageDecodeError(DataError):
    """An image file that cannot be decoded.

    A DataLoader worker re-raises an exception as `type(error)("Caught ... Original Traceback ...")`; this
    class keeps only the original one-line message, so the CLI still prints one clear line.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass(frozen=True)
class DetectionRecord:
    """One image and its objects: boxes as x1, y1, x2, y2 in pixels of the native image (or, with
    `normalized`, as YOLO's cx, cy, w, h in 0..1, converted once the image's size is known)."""

    image: str | int  # a file path, or an index into in-memory images
    boxes: np.ndarray  # (n, 4) float32
    classes: np.ndarray  # (n,) int64
    difficult: np.ndarray  # (n,) bool
    normalized: bool = False

    def without_difficult(self) -> DetectionRecord:
        keep = ~self.difficult
        return DetectionRecord(self.image, self.boxes[keep], self.classes[keep], self.difficult[keep], self.normalized)


def read_image(path: str) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB; ImageDecodeError naming the file if it does not decode."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        reason = "file not found" if not os.path.exists(path) else "not a decodable image (truncated or not an image?)"
        raise ImageDecodeError(f"cannot decode image {path}: {reason}; fix or remove it (and its annotation)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize so the longer side is `size` (keeping the aspect ratio) and pad to size x size, centred.

    Returns the image, the scale and the (left, top) padding: x_input = x_native * scale + left.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = image
    return out, scale, (left, top)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation (ultralytics' defaults without mosaic): applied after the letterbox.

    Args:
        hsv_h, hsv_s, hsv_v: hue shift (fraction of the circle) and saturation / value gains (1 +- x).
        fliplr: probability of a horizontal flip.
        scale: random zoom in 1 +- scale.
        translate: random shift up to this fraction of the side.
        min_visibility: boxes keeping less than this fraction of their area in the frame are dropped.
    """

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    fliplr: float = 0.5
    scale: float = 0.5
    translate: float = 0.1
    min_visibility: float = 0.1

    def __post_init__(self) -> None:
        for name in ("hsv_h", "hsv_s", "hsv_v", "fliplr", "scale", "translate", "min_visibility"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise DataError(f"data augmentation {name} must be in [0, 1], got {value!r}")

    def build(self, seed: int):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        import albumentations as A

        transforms = []
        if self.scale or self.translate:
            transforms.append(A.Affine(
                scale=(1 - self.scale, 1 + self.scale), translate_percent=(-self.translate, self.translate),
                rotate=0, shear=0, border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, p=1.0,
            ))
        if self.fliplr:
            transforms.append(A.HorizontalFlip(p=self.fliplr))
        if self.hsv_h or self.hsv_s or self.hsv_v:
            transforms.append(A.ColorJitter(
                brightness=self.hsv_v, contrast=0, saturation=self.hsv_s, hue=self.hsv_h, p=1.0,
            ))
        bbox_params = A.BboxParams(
            format="pascal_voc", label_fields=["classes"], min_visibility=self.min_visibility,
            min_width=2, min_height=2, clip=True,
        )
        return A.Compose(transforms, bbox_params=bbox_params, seed=seed)


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
            serves the next image instead.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        image_size: int,
        load: Callable[[Any], np.ndarray] | None = None,
        augmentation: Augmentation | None = None,
        corruption: tuple[str, int, str, int] | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.load = load or read_image
        self.augmentation = augmentation
        self.corruption = corruption
        self.on_bad_image = on_bad_image
        self._transform = None
        self._transform_seed: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    def with_corruption(self, name: str, severity: int, profile: str, seed: int) -> DetectionDataset:
        return DetectionDataset(self.records, self.image_size, self.load, None, (name, severity, profile, seed),
                                self.on_bad_image)

    def _augment(self, image, boxes, classes):
        # One albumentations pipeline per process, seeded from torch's seed: a DataLoader worker's seed
        # changes every epoch and follows seed_everything, so augmentation is reproducible.
        seed = torch.initial_seed() % 2**32
        if self._transform is None or self._transform_seed != seed:
            self._transform, self._transform_seed = self.augmentation.build(seed), seed
        out = self._transform(image=image, bboxes=boxes, classes=classes)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return out["image"], boxes, np.asarray(out["classes"], dtype=np.int64).reshape(-1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.records)):
            try:
                return self._sample((index + attempt) % len(self.records))
            except ImageDecodeError as error:
                if self.on_bad_image == "error":
                    raise
                log.warning("skipping %s", error)
        raise DataError("no image of the dataset decodes")

    def _sample(self, index: int) -> dict[str, Any]:
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
        classes = record.classes
        if self.augmentation is not None:
            keep = (net_boxes[:, 2] > net_boxes[:, 0]) & (net_boxes[:, 3] > net_boxes[:, 1])
            net_image, net_boxes, classes = self._augment(net_image, net_boxes[keep], classes[keep])
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


def detection_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """ultralytics' batch format plus the per-image ground truth that mAP needs."""
    counts = [len(s["cls"]) for s in samples]
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
            train = records["train"] if self.train_difficult else [r.without_difficult() for r in records["train"]]
            augmentation = self.augmentation if self.augment else None
            self.train_set = DetectionDataset(train, self.image_size, self.load_image, augmentation,
                                              on_bad_image=self.on_bad_image)
            self.val_set = DetectionDataset(records["val"], self.image_size, self.load_image,
                                            on_bad_image=self.on_bad_image)
            self.test_sets = {"clean": DetectionDataset(records["test"], self.image_size, self.load_image,
                                                        on_bad_image=self.on_bad_image)}
        if stage in (None, "test") and len(self.test_sets) == 1:
            settings = self.corrupted_test
            if settings.cache_dir and settings.splits():
                log.info("detection test images are corrupted on the fly; corrupted_test.cache_dir is not used")
            clean = self.test_sets["clean"]
            for corruption, severity in settings.splits():
                self.test_sets[split_name(corruption, severity)] = clean.with_corruption(
                    corruption, severity, settings.profile, settings.seed
                )

    @property
    def test_split_names(self) -> list[str]:
        """Names of the test dataloaders, in dataloader_idx order."""
        return list(self.test_sets) or ["clean"]

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
        return self._loader(self.test_sets["clean"], self.eval_batch_size, self.num_workers, False)


# ----------------------------------------------------------------------------------------------- Pascal VOC


def parse_voc_annotation(path: Path, class_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (x1, y1, x2, y2 in 0-based continuous pixels), classes and difficult flags of one VOC XML."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise DataError(f"cannot read VOC annotation {path}: {error}") from None
    boxes, classes, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise DataError(f"{path}: unknown class {name!r}; expected one of data.class_names ({len(class_index)})")
        box = obj.find("bndbox")
        try:
            # VOC pixels are 1-based and inclusive: pixel columns xmin..xmax cover [xmin - 1, xmax].
            x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{path}: object {name!r} has no valid bndbox") from None
        if x2 < x1 or y2 < y1:
            raise DataError(f"{path}: object {name!r} has an inverted box ({x1}, {y1}, {x2}, {y2})")
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        classes.append(class_index[name])
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(classes, dtype=np.int64),
            np.asarray(difficult, dtype=bool))


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


class VOCDataModule(DetectionDataModule):
    """Pascal VOC detection (20 classes) from a VOCdevkit folder or a YOLO-format folder.

    Layouts:
      - voc: `<root>/VOC<year>/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<set>.txt}`
        (root may also be the folder holding VOCdevkit/); sets are written "<year>/<image set>".
      - yolo: `<root>/images/<set>/*.jpg` and `<root>/labels/<set>/*.txt` (`class cx cy w h`, normalised;
        no difficult flags); sets are sub-folder names ("." for images/ itself).

    Defaults are the standard split: train on VOC2007+2012 trainval (16,551 images), test on VOC2007 test
    (4,952). ultralytics also validates on VOC2007 test, so that is the default val set; set `val_sets` to
    something else to keep the test set out of model selection.

    Args:
        root: the dataset folder.
        layout: voc, yolo, or auto (yolo when root has images/ and labels/).
        train_sets, val_sets, test_sets: the image sets of each split.
        class_names: the classes, in label order (default: VOC's 20), or just their number (YOLO labels,
            e.g. 80 for coco128); YOLO labels must be below their count.
        (the rest: see DetectionDataModule)
    """

    name = "voc"

    def __init__(
        self,
        root: str = "data/VOCdevkit",
        layout: Literal["auto", "voc", "yolo"] = "auto",
        train_sets: list[str] = ["2007/trainval", "2012/trainval"],  # noqa: B006 (never mutated)
        val_sets: list[str] = ["2007/test"],  # noqa: B006
        test_sets: list[str] = ["2007/test"],  # noqa: B006
        class_names: list[str] | int = list(VOC_CLASSES),  # noqa: B006, B008
        image_size: int = 640,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = True,
        augmentation: Augmentation = Augmentation(),  # noqa: B008
        train_difficult: bool = False,
        on_bad_image: Literal["error", "skip"] = "error",
        corrupted_test: CorruptedTest = CorruptedTest(profile="imagenet"),  # noqa: B008
    ) -> None:
        super().__init__(
            class_names, image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, augment=augment, augmentation=augmentation, train_difficult=train_difficult,
            on_bad_image=on_bad_image, corrupted_test=corrupted_test,
        )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"VOC root not found: '{self.root}' (set data.init_args.root to your VOCdevkit folder)")
        self.layout = self._detect_layout(layout)
        self.sets = {"train": list(train_sets), "val": list(val_sets), "test": list(test_sets)}
        for split, names in self.sets.items():
            if not names:
                raise DataError(f"data.{split}_sets is empty: name at least one image set")
            for set_name in names:
                self._check_set(set_name)

    def _detect_layout(self, layout: str) -> str:
        if layout != "auto":
            return layout
        if (self.root / "images").is_dir() and (self.root / "labels").is_dir():
            return "yolo"
        if (self.root / "VOCdevkit").is_dir():
            self.root = self.root / "VOCdevkit"
        return "voc"

    def _voc_folder(self, set_name: str) -> tuple[Path, str]:
        year, _, image_set = set_name.partition("/")
        if not year.isdigit() or not image_set:
            raise DataError(f"VOC image set {set_name!r} must be written '<year>/<set>', e.g. 2007/trainval")
        return self.root / f"VOC{year}", image_set

    def _check_set(self, set_name: str) -> None:
        if self.layout == "yolo":
            folder = self.root / "images" / set_name
            if not folder.is_dir():
                raise DataError(
                    f"no image folder {folder} for set {set_name!r} (YOLO layout: images/<set>, labels/<set>)"
                )
            return
        folder, image_set = self._voc_folder(set_name)
        for needed in ("Annotations", "JPEGImages"):
            if not (folder / needed).is_dir():
                raise DataError(
                    f"{folder} has no {needed}/: expected the VOCdevkit layout "
                    f"<root>/VOC<year>/{{Annotations,JPEGImages,ImageSets/Main}} (set {set_name!r}); "
                    "check data.init_args.root and the *_sets lists"
                )
        listing = folder / "ImageSets" / "Main" / f"{image_set}.txt"
        if not listing.is_file():
            raise DataError(f"image set list {listing} not found (set {set_name!r})")

    def _voc_records(self, set_name: str) -> list[DetectionRecord]:
        folder, image_set = self._voc_folder(set_name)
        listing = folder / "ImageSets" / "Main" / f"{image_set}.txt"
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        class_index = {name: i for i, name in enumerate(self.class_names)}
        records = []
        for image_id in ids:
            annotation = folder / "Annotations" / f"{image_id}.xml"
            if not annotation.is_file():
                raise DataError(f"missing annotation {annotation} for id {image_id} listed in {listing}")
            boxes, classes, difficult = parse_voc_annotation(annotation, class_index)
            records.append(DetectionRecord(str(folder / "JPEGImages" / f"{image_id}.jpg"), boxes, classes, difficult))
        return records

    def _yolo_records(self, set_name: str) -> list[DetectionRecord]:
        images = self.root / "images" / set_name
        labels = self.root / "labels" / set_name
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
        records = []
        for file in files:
            boxes, classes = parse_yolo_labels(labels / f"{file.stem}.txt", self.num_classes)
            records.append(DetectionRecord(str(file), boxes, classes, np.zeros(len(classes), bool), normalized=True))
        return records

    def load_records(self) -> dict[str, list[DetectionRecord]]:
        read = self._yolo_records if self.layout == "yolo" else self._voc_records
        cache: dict[str, list[DetectionRecord]] = {}
        records = {}
        for split, names in self.sets.items():
            records[split] = []
            for set_name in names:
                if set_name not in cache:
                    cache[set_name] = read(set_name)
                records[split] += cache[set_name]
        return records
