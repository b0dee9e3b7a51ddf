"""Pascal VOC detection data: VOCdevkit XML annotations (or the same images in the YOLO txt layout).

The generic detection layer (dataset, collate, DataModule base) is `datamodules/detection/`; YOLO label
parsing is `datamodules/yolo_format.py`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.corruptions.splits import CorruptedTest
from datamodules.detection import Augmentation, DetectionDataModule, DetectionRecord
from datamodules.errors import DataError
from datamodules.yolo_format import check_yolo_labels, class_names_from_data_yaml, read_utf8, yolo_records

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


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
        class_names: the classes, in label order (default: VOC's 20), or the path of an ultralytics data YAML
            holding them (`names:`), or just their number (YOLO labels, e.g. 80 for coco128; names class0..);
            YOLO labels must be below their count.
        dataset_name: the dataset's name in results rows and W&B (default: "voc" for the VOCdevkit layout, the
            root folder's name for the YOLO layout, e.g. coco128).
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
        class_names: list[str] | int | str = list(VOC_CLASSES),  # noqa: B006, B008
        image_size: int = 640,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = True,
        augmentation: Augmentation = Augmentation(),  # noqa: B008
        train_difficult: bool = False,
        on_bad_image: Literal["error", "skip"] = "error",
        corrupted_test: CorruptedTest = CorruptedTest(profile="imagenet"),  # noqa: B008
        dataset_name: str | None = None,
    ) -> None:
        if isinstance(class_names, str):
            class_names = class_names_from_data_yaml(class_names)
        super().__init__(
            class_names, image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, augment=augment, augmentation=augmentation, train_difficult=train_difficult,
            on_bad_image=on_bad_image, corrupted_test=corrupted_test,
        )
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"VOC root not found: '{self.root}' (set data.init_args.root to your VOCdevkit folder)")
        self.layout = self._detect_layout(layout)
        self.name = dataset_name or ("voc" if self.layout == "voc" else self.root.name)
        self.sets = {"train": list(train_sets), "val": list(val_sets), "test": list(test_sets)}
        for split, names in self.sets.items():
            if not names:
                raise DataError(f"data.{split}_sets is empty: name at least one image set")
        for set_name in dict.fromkeys(n for names in self.sets.values() for n in names):  # each once (one warning)
            self._check_set(set_name)

    def _detect_layout(self, layout: str) -> str:
        if layout != "auto":
            return layout
        if (self.root / "images").is_dir() and (self.root / "labels").is_dir():
            return "yolo"
        if (self.root / "VOCdevkit").is_dir():
            self.root = self.root / "VOCdevkit"
        elif (self.root / "images").is_dir() and not any(self.root.glob("VOC*")):
            # else the VOC layout's "has no Annotations/" would name the wrong fix
            raise DataError(f"{self.root} has images/ but no labels/: the YOLO layout needs labels/<set>/<image "
                            "name>.txt beside images/<set>/")
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
            check_yolo_labels(self.root, set_name)  # before a run folder is written, not after training
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
        ids = [line.split()[0] for line in read_utf8(listing, "image set list").splitlines() if line.strip()]
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
        return yolo_records(self.root, set_name, self.num_classes)

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
