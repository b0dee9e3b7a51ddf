"""Helpers of `DetectionModule`: offline ultralytics import, YOLOv5u construction, NMS, EMA, quantization policy."""

from lightning_modules.yolo.ema import ModelEMA
from lightning_modules.yolo.model import (
    DFL_CONV_PATTERN,
    HEAD_OUTPUT_PATTERNS,
    YOLO_MODELS,
    build_yolo,
    check_quantization_policy,
    head_output_convs,
    import_ultralytics,
    load_pretrained,
)
from lightning_modules.yolo.nms import non_max_suppression, to_original_coordinates

__all__ = [
    "DFL_CONV_PATTERN",
    "HEAD_OUTPUT_PATTERNS",
    "YOLO_MODELS",
    "ModelEMA",
    "build_yolo",
    "check_quantization_policy",
    "head_output_convs",
    "import_ultralytics",
    "load_pretrained",
    "non_max_suppression",
    "to_original_coordinates",
]
