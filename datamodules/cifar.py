"""CIFAR-10 and CIFAR-100, from torchvision's pickled format or an ImageFolder tree of image files.

Accepted layouts under `root`:
- torchvision's: `cifar-10-batches-py/` or `cifar-100-python/` (what `download: true` fetches);
- ImageFolder: `train/<class>/*` and `test/<class>/*`, image files of any type Pillow opens (PNG, JPEG, WebP,
  BMP, TIFF, GIF, ...; e.g. the JPEG mirror in `../shared/data/cifar10-jpeg.tar.gz`, extracted). Every class
  folder must hold at least one image; 16-bit greyscale images are scaled to 8 bits (value / 257, rounded);
  other files (and hidden ones, such as macOS `._*` companions) are ignored and counted in the line each
  split prints: `train: 10 classes, 5000 images (airplane 500, ...)`.
Nothing is downloaded unless `download: true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from PIL import Image

from datamodules.array_cache import CacheWarning, load_array, save_array, save_json
from datamodules.base import ImageClassificationDataModule
from datamodules.errors import DataError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# Bump when decoding changes what a file decodes to: the decoded-image cache is keyed by it as well as by the
# files' content (v2: 16-bit greyscale scaled to 8 bits instead of clipped to 255).
DECODING = "rgb8-v2"
# Pillow's 16-bit and 32-bit integer greyscale modes: convert("RGB") would clip them at 255.
_WIDE_GREY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def readable_suffixes() -> frozenset[str]:
    """The file name suffixes Pillow can open (.png, .jpg, .webp, .bmp, .tif, .gif, ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _rgb8(image, path)
    except OSError as error:
        raise DataError(f"cannot decode image {path}: {error}; remove or replace it") from None


def _rgb8(image: Image.Image, path: Path) -> np.ndarray:
    """uint8 HxWx3 RGB; 16-bit greyscale scaled by 1/257 (rounded) so that 65535 maps to 255."""
    if image.mode in _WIDE_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{path} has {image.mode} pixels outside 0..65535; save it as 8- or 16-bit")
        grey = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): no ties for integers
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise DataError(f"{path} has floating-point pixels (no fixed range); save it as 8- or 16-bit")
    return np.asarray(image.convert("RGB"))


@dataclass
class FolderListing:
    """The image files of one split, in class order, and what was left out."""

    split_dir: Path
    class_names: list[str]
    paths: list[Path] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignored: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line: `train: 10 classes, 5000 images (airplane 500, ...)`, or `500 each` when all are equal."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        per_class = (f"{counts[0]} each" if len(set(counts.tolist())) == 1 else
                     ", ".join(f"{name} {count}" for name, count in zip(self.class_names, counts, strict=True)))
        line = f"{self.split_dir.name}: {len(self.class_names)} classes, {len(self.paths)} images ({per_class})"
        if self.ignored:
            example = self.ignored[0].relative_to(self.split_dir.parent)
            line += f"; ignored {len(self.ignored)} other files (not images Pillow opens, or hidden), e.g. {example}"
        return line


def list_image_folder(split_dir: Path, class_names: list[str]) -> FolderListing:
    """The files of `split_dir/<class>/*` that are images, labelled by `class_names`; refuses a missing, extra
    or empty class folder (an empty one would silently leave a class out of training or testing)."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if sorted(class_names) != found:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        raise DataError(f"{split_dir} has class folders {missing=} {extra=} compared with the dataset's classes")
    listing, suffixes, labels = FolderListing(split_dir, list(class_names)), readable_suffixes(), []
    for label, name in enumerate(class_names):
        entries = sorted((split_dir / name).iterdir())
        # hidden files are never images of the set: macOS `._x.jpg` companions, .DS_Store
        files = [p for p in entries if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()]
        if not files:
            others = f" (only {len(entries)} other files, e.g. {entries[0].name})" if entries else ""
            raise DataError(f"class folder {split_dir / name} has no images{others}; every class needs images, "
                            "or the model would silently be trained or tested on fewer classes")
        listing.paths += files
        accepted = set(files)
        listing.ignored += [p for p in entries if p not in accepted]
        labels += [label] * len(files)
    listing.labels = np.asarray(labels, dtype=np.int64)
    return listing


@rank_zero_only
def say(line: str) -> None:
    print(line, flush=True)


def load_image_folder(split_dir: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode `split_dir/<class>/*` into uint8 (N, H, W, 3) and labels indexed by `class_names`."""
    return decode_listing(list_image_folder(split_dir, class_names))


def decode_listing(listing: FolderListing) -> tuple[np.ndarray, np.ndarray]:
    split_dir, paths, labels = listing.split_dir, listing.paths, listing.labels
    # Decoding 60k small JPEGs takes tens of seconds; keep the decoded arrays next to the data, keyed by the
    # content of every image file (an image replaced by another of the same size, its time kept, is decoded
    # again) and checked against the digest of the array itself when loaded. Reading every file for its
    # content digest costs ~10 % of decoding, so a note maps the files' stat signature (sizes, times, inode and
    # ctime, which a replacement always changes) to the content digest it was computed for: an unchanged
    # folder costs one stat per file; a changed one (touched, copied, re-extracted) is read again. Both cover
    # the list of files read, so a file newly accepted or left out changes them.
    folder = split_dir.parent / ".qreg-cache"
    note = folder / f"{split_dir.name}-files-{stat_signature(split_dir, paths)[:16]}.json"
    try:
        source, noted = json.loads(note.read_text())["content"], True
    except (OSError, ValueError, KeyError, TypeError):
        source, noted = source_digest(split_dir, paths), False
    # the array depends on the decoder as well as on the files
    key = hashlib.blake2b(f"{DECODING}:{source}".encode(), digest_size=20).hexdigest()
    cache = folder / f"{split_dir.name}-{key[:16]}.npy"
    cached = load_array(cache, key, what="decoded-image cache", mmap=True)
    if cached is not None and cached.shape[0] == len(paths):
        if not noted:
            _note_quietly(note, source)
        return np.ascontiguousarray(cached), labels
    decoded = [_decode(p) for p in paths]
    shapes = {im.shape for im in decoded}
    if len(shapes) != 1:
        raise DataError(f"images under {split_dir} differ in size: {sorted(shapes)[:3]}")
    images = np.stack(decoded)
    _save_quietly(cache, images, key)
    _note_quietly(note, source)
    return images, labels


def _note_quietly(note: Path, source: str) -> None:
    with contextlib.suppress(OSError):
        save_json(note, {"content": source})


def stat_signature(root: Path, paths: list[Path]) -> str:
    """BLAKE2b over every file's name, size, modification and change times and inode."""
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:"
                      f"{stat.st_ino}\n".encode())
    return digest.hexdigest()


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
        if not download and self._layout() == "image_folder":
            # fail at construction, before a Trainer is built or a run folder written, when the data is missing
            # or a class folder is empty (listing 60k files takes a fraction of a second)
            self._listings()

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
        arrays = []
        for listing in self._listings():
            say(listing.summary())  # what was read, per class: a class that dropped out shows here
            arrays += decode_listing(listing)
        return tuple(arrays)

    def _listings(self) -> tuple[FolderListing, FolderListing]:
        class_names = self._class_names(self.root / "train")
        return tuple(list_image_folder(self.root / split, class_names) for split in ("train", "test"))


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
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(names) != 100:
            raise DataError(f"{root} has {len(names)} class folders; CIFAR-100 has 100")
        return names
