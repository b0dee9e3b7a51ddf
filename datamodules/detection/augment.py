"""Training augmentation of detection samples (albumentations 2.0.8, bbox-aware)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2

from datamodules.detection.annotations import PAD_VALUE
from datamodules.errors import DataError

MOSAIC_KEY = "mosaic_metadata"


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation (ultralytics' defaults): applied after the letterbox.

    Args:
        mosaic: probability of a 4-image mosaic (YOLOv5 and ultralytics train from scratch with 1.0; off by
            default here, on in the paper-scale VOC config): the image and 3 random others of the training set,
            each letterboxed, on a 2 x 2 grid; the view of the network input's size around a random centre
            is kept (albumentations' `Mosaic`, centre in the middle half of the grid), boxes follow.
        close_mosaic: no mosaic in the last this many epochs (ultralytics' default 10), so the network ends
            on whole images.
        hsv_h, hsv_s, hsv_v: hue shift (fraction of the circle) and saturation / value gains (1 +- x).
        fliplr: probability of a horizontal flip.
        scale: random zoom in 1 +- scale.
        translate: random shift up to this fraction of the side.
        min_visibility: boxes keeping less than this fraction of their area in the frame are dropped.
    """

    mosaic: float = 0.0
    close_mosaic: int = 10
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    fliplr: float = 0.5
    scale: float = 0.5
    translate: float = 0.1
    min_visibility: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.close_mosaic, bool) or not isinstance(self.close_mosaic, int) or self.close_mosaic < 0:
            raise DataError(f"data augmentation close_mosaic must be an integer >= 0, got {self.close_mosaic!r}")
        for name in ("mosaic", "hsv_h", "hsv_s", "hsv_v", "fliplr", "scale", "translate", "min_visibility"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise DataError(f"data augmentation {name} must be in [0, 1], got {value!r}")

    def mosaic_in(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether epoch (0-based) of a run of max_epochs uses mosaic."""
        return self.mosaic > 0 and (not max_epochs or max_epochs < 0 or epoch < max_epochs - self.close_mosaic)

    def build(self, seed: int, image_size: int, mosaic: bool = False):
        """The albumentations pipeline; with `mosaic`, call it with `mosaic_metadata` = the 3 other images."""
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        import albumentations as A

        transforms = []
        if mosaic and self.mosaic > 0:
            side = (image_size, image_size)
            # Like YOLOv5's mosaic: the centre falls in the middle half of the 2 x 2 canvas, grey elsewhere.
            transforms.append(A.Mosaic(
                grid_yx=(2, 2), target_size=side, cell_shape=side, center_range=(0.25, 0.75), fit_mode="contain",
                fill=PAD_VALUE, metadata_key=MOSAIC_KEY, p=self.mosaic,
            ))
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

