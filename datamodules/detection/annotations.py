"""One detection record, image decoding and the letterbox: what every detection dataset shares."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from datamodules.errors import DataError

PAD_VALUE = 114  # ultralytics' letterbox grey
MAX_STRIDE = 32  # YOLOv5's largest stride: the input side must be a multiple of it


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


