"""Training augmentation of detection samples (albumentations 2.0.8, bbox-aware)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2

from datamodules.detection.records import PAD_VALUE
from datamodules.errors import DataError


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

