"""Helpers of `DetectionModule`: the anchor-based YOLOv5 and its loss, offline ultralytics import and YOLOv5u
construction, NMS, EMA, quantization policy."""

from lightning_modules.yolo.anchor_loss import AnchorYOLOLoss
from lightning_modules.yolo.anchor_model import AnchorDetect, AnchorYOLOv5
from lightning_modules.yolo.ema import ModelEMA
from lightning_modules.yolo.model import (
    ANCHOR_MODELS,
    DFL_CONV_PATTERN,
    HEAD_OUTPUT_PATTERNS,
    V5U_MODELS,
    YOLO_MODELS,
    build_criterion,
    build_yolo,
    check_quantization_policy,
    head_output_convs,
    import_ultralytics,
    is_anchor_based,
    load_pretrained,
)
from lightning_modules.yolo.nms import non_max_suppression, to_original_coordinates

__all__ = [
    "ANCHOR_MODELS",
    "DFL_CONV_PATTERN",
    "HEAD_OUTPUT_PATTERNS",
    "V5U_MODELS",
    "YOLO_MODELS",
    "AnchorDetect",
    "AnchorYOLOLoss",
    "AnchorYOLOv5",
    "ModelEMA",
    "build_criterion",
    "build_yolo",
    "check_quantization_policy",
    "head_output_convs",
    "import_ultralytics",
    "is_anchor_based",
    "load_pretrained",
    "non_max_suppression",
    "to_original_coordinates",
]
