"""CIFAR-10 and CIFAR-100, from torchvision's pickled format or an ImageFolder tree of image files.

Accepted layouts under `root`:
- torchvision's: `cifar-10-batches-py/` or `cifar-100-python/` (what `download: true` fetches);
- ImageFolder: `train/<class>/*.{png,jpg}` and `test/<class>/*.{png,jpg}` (e.g. the JPEG mirror in
  `../shared/data/cifar10-jpeg.tar.gz`, extracted).
Nothing is downloaded unless `download: true`.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.array_cache import CacheWarning, load_array, save_array
from datamodules.base import ImageClassificationDataModule
from datamodules.errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"cannot decode image {path}: {error}") from None


def load_image_folder(split_dir: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode `split_dir/<class>/*` into uint8 (N, H, W, 3) and labels indexed by `class_names`."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if sorted(class_names) != found:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        raise DataError(f"{split_dir} has class folders {missing=} {extra=} compared with the dataset's classes")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    labels = np.asarray(labels, dtype=np.int64)
    # Decoding 60k small JPEGs takes tens of seconds; keep the decoded arrays next to the data, keyed by the
    # content of every image file (not sizes and times: an image replaced by another of the same size with its
    # time kept is decoded again), and checked against the digest of the array itself when loaded.
    source = source_digest(split_dir, paths)
    cache = split_dir.parent / ".qreg-cache" / f"{split_dir.name}-{source[:16]}.npy"
    cached = load_array(cache, source, what="decoded-image cache", mmap=True)
    if cached is not None and cached.shape[0] == len(paths):
        return np.ascontiguousarray(cached), labels
    decoded = [_decode(p) for p in paths]
    shapes = {im.shape for im in decoded}
    if len(shapes) != 1:
        raise DataError(f"images under {split_dir} differ in size: {sorted(shapes)[:3]}")
    images = np.stack(decoded)
    _save_quietly(cache, images, source)
    return images, labels


def source_digest(root: Path, paths: list[Path]) -> str:
    """BLAKE2b over every file's name and bytes, in order."""
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _save_quietly(path: Path, array: np.ndarray, source: str) -> None:
    """Write a cache atomically; a read-only (or full) data folder just means no cache."""
    try:
        save_array(path, array, source)
    except OSError as error:
        warnings.warn(f"cannot write the decoded-image cache {path} ({error.strerror}); continuing without it",
                      CacheWarning, stacklevel=2)


class _CIFARDataModule(ImageClassificationDataModule):
    train_size = 50_000
    torchvision_folder: str = ""
    download_size: str = ""

    def __init__(self, root: str = "data/cifar", download: bool = False, **kwargs) -> None:
        """
        Args:
            root: folder holding torchvision's files or the train/ and test/ class folders.
            download: fetch torchvision's files into root when missing (the only network access).
        """
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.download = download
        if not download:
            self._layout()  # fail at construction, before a Trainer is built, when the data is missing

    def _layout(self) -> str:
        if (self.root / self.torchvision_folder).is_dir():
            return "torchvision"
        if (self.root / "train").is_dir() and (self.root / "test").is_dir():
            return "image_folder"
        raise DataError(
            f"{self.name} not found under '{self.root}': expected torchvision's '{self.torchvision_folder}/' "
            f"or ImageFolder 'train/<class>/' and 'test/<class>/' folders; set data.init_args.root to it, "
            f"or data.init_args.download: true to fetch it ({self.download_size})"
        )

    def prepare_data(self) -> None:
        if self.download and not (self.root / self.torchvision_folder).exists():
            for train in (True, False):
                self._torchvision_dataset(train, download=True)

    def _torchvision_dataset(self, train: bool, download: bool = False):
        raise NotImplementedError

    def _class_names(self, root: Path) -> list[str]:
        raise NotImplementedError

    def load(self):
        if self._layout() == "torchvision":
            train, test = self._torchvision_dataset(True), self._torchvision_dataset(False)
            return (train.data, np.asarray(train.targets, dtype=np.int64),
                    test.data, np.asarray(test.targets, dtype=np.int64))
        class_names = self._class_names(self.root / "train")
        train_images, train_labels = load_image_folder(self.root / "train", class_names)
        test_images, test_labels = load_image_folder(self.root / "test", class_names)
        return train_images, train_labels, test_images, test_labels


class CIFAR10DataModule(_CIFARDataModule):
    name = "cifar10"
    num_classes = 10
    class_names = CIFAR10_CLASSES
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    torchvision_folder = "cifar-10-batches-py"
    download_size = "163 MB"

    def _torchvision_dataset(self, train: bool, download: bool = False):
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.root), train=train, download=download)

    def _class_names(self, root: Path) -> list[str]:
        return list(CIFAR10_CLASSES)


class CIFAR100DataModule(_CIFARDataModule):
    name = "cifar100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    torchvision_folder = "cifar-100-python"
    download_size = "161 MB"

    def _torchvision_dataset(self, train: bool, download: bool = False):
        from torchvision.datasets import CIFAR100

        return CIFAR100(str(self.root), train=train, download=download)

    def _class_names(self, root: Path) -> list[str]:
        # torchvision's fine-label order is alphabetical, so sorted folder names index the same way.
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if len(names) != 100:
            raise DataError(f"{root} has {len(names)} class folders; CIFAR-100 has 100")
        return names
