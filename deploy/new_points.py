"""New 8-bit rounding points of the `onnx-int8` graph: tensors the trained model computes in float that the
integer graph carries as 8-bit integers, on a grid set by their range over training images."""

from __future__ import annotations

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper

from deploy.onnx_qdq import INPUT_NAME

_PIXELS_PER_BATCH = 256 * 32 * 32  # 256 CIFAR images, or one 512x512 image: every probed tensor is kept


def calibrate(model: ModelProto, values: list[str], images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """The range of each named tensor of `model` (the exact QDQ graph) over `images`, in ONNX Runtime, widened to
    hold 0 (a grid with a zero point represents 0 exactly)."""
    from deploy.verify import session

    if not values:
        return {}
    probe = ModelProto()
    probe.CopyFrom(model)
    for name in values:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    runtime = session(probe.SerializeToString())
    ranges = dict.fromkeys(values, (0.0, 0.0))
    batch_size = max(1, _PIXELS_PER_BATCH // (images.shape[-1] * images.shape[-2]))
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float().contiguous().numpy()
        outputs = runtime.run(values, {INPUT_NAME: batch})
        for name, output in zip(values, outputs, strict=True):
            low, high = ranges[name]
            ranges[name] = min(low, float(output.min())), max(high, float(output.max()))
    return ranges


def new_point_grid(low: float, high: float, dtype) -> tuple[np.float32, int]:
    """Scale and zero point of 256 levels spanning [low, high] (which holds 0) in `dtype` (uint8 or int8).

    Asymmetric, so a skewed range gets the finest step it can; from 0 where a ReLU is taken in (low = 0: the
    saturation below the zero point is the ReLU)."""
    step = (high - low) / 255 if high > low else 1.0
    zero_point = int(np.clip(round(-low / step), 0, 255)) + int(np.iinfo(dtype).min)
    return np.float32(step), zero_point
