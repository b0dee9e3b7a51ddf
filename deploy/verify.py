"""Run an exported model in ONNX Runtime and compare it with the PyTorch model it came from."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy.onnx_qdq import INPUT_NAME, flat_outputs
from lightning_modules.yolo.anchor_model import DETECTIONS_OUTPUT


@dataclass(frozen=True)
class OutputDifference:
    """One output of the graph against the same output of the PyTorch model."""

    name: str
    max_difference: float  # largest |difference| over its values
    output_range: float  # largest |value| of the PyTorch output, for scale

    @property
    def relative(self) -> float:
        return self.max_difference / self.output_range if self.output_range else self.max_difference


@dataclass(frozen=True)
class DetectionAgreement:
    """The detections left after NMS, PyTorch's against the exported model's."""

    score_threshold: float
    iou_threshold: float
    reference: int  # PyTorch's detections over all images
    matched: int  # of those, how many the exported model also made (same class, IoU >= iou_threshold)
    exported: int  # the exported model's detections over all images
    matched_at_half: int = 0  # the same at IoU >= 0.5, the overlap a detection benchmark (mAP50) counts as found

    @property
    def found_share(self) -> float | None:
        """Share of PyTorch's detections found again; None where PyTorch made none (nothing to compare)."""
        return self.matched / self.reference if self.reference else None

    def describe(self) -> str:
        return (f"detections after NMS (score >= {self.score_threshold:g}): {self.matched}/{self.reference} of "
                f"PyTorch's found again (same class, IoU >= {self.iou_threshold:g}; {self.matched_at_half} at IoU "
                f">= 0.5), {self.exported} in all")


def detection_agreement(reference: np.ndarray, exported: np.ndarray, score_threshold: float = 0.25,
                        iou_threshold: float = 0.9) -> DetectionAgreement:
    """Both decoded outputs (B, 4 + classes, boxes) through the same NMS; each PyTorch detection is matched to
    the exported model's best-overlapping detection of its class in the same image."""
    from torchvision.ops import box_iou

    from lightning_modules.yolo.nms import non_max_suppression

    ours = non_max_suppression(torch.from_numpy(reference), conf_threshold=score_threshold)
    theirs = non_max_suppression(torch.from_numpy(exported), conf_threshold=score_threshold)
    matched = matched_at_half = 0
    for a, b in zip(ours, theirs, strict=True):
        if len(a) and len(b):
            same_class = a[:, 5:6] == b[:, 5].unsqueeze(0)
            best = (box_iou(a[:, :4], b[:, :4]) * same_class).max(1).values
            matched += int((best >= iou_threshold).sum())
            matched_at_half += int((best >= 0.5).sum())
    return DetectionAgreement(score_threshold, iou_threshold, sum(map(len, ours)), matched, sum(map(len, theirs)),
                              matched_at_half)


@dataclass(frozen=True)
class Agreement:
    """How an exported model's outputs compare with the PyTorch model's on the same images."""

    images: int
    outputs: tuple[OutputDifference, ...]
    top1_agreement: float | None  # fraction of images with the same argmax (classifiers: one (N, C) output)
    detections: DetectionAgreement | None = None  # detectors (an output named DETECTIONS_OUTPUT)

    @property
    def max_difference(self) -> float:
        return max(output.max_difference for output in self.outputs)

    @property
    def output_range(self) -> float:
        return max(output.output_range for output in self.outputs)

    @property
    def worst_relative_difference(self) -> float:
        """The largest difference as a fraction of its own output's range, over the outputs; a detector's decoded
        boxes left out (a box's width grows as the square of its raw value: a raw difference of a percent moved
        decoded corners by 6 % of the image in the onnx-int8 detector while every raw map stayed within 1.5 %)."""
        return max(output.relative for output in self.outputs
                   if self.detections is None or output.name != DETECTIONS_OUTPUT)

    def describe(self) -> str:
        parts = [f"on {self.images} images"]
        if self.top1_agreement is not None:
            same = round(self.top1_agreement * self.images)
            parts.append(f"top-1 agreement {same}/{self.images} ({100 * self.top1_agreement:.2f} %)")
            parts.append(f"largest logit difference {self.max_difference:.3g} (logits up to {self.output_range:.3g})")
        else:
            parts.append("largest difference " + ", ".join(
                f"{o.name} {o.max_difference:.3g} (values up to {o.output_range:.3g})" for o in self.outputs))
        if self.detections is not None:
            parts.append(self.detections.describe())
        return ", ".join(parts)


def session(path: str | Path | bytes, threads: int | None = None, optimized_model: str | Path | None = None):
    """An ONNX Runtime CPU session with every graph optimisation on (what a deployment would use); `path` may
    also be a serialized model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def runtime_kernels(path: str | Path, scratch: Path) -> dict[str, int]:
    """Node types of the graph ONNX Runtime runs after its optimisations (QLinearConv = integer kernels)."""
    import onnx

    optimized = scratch / f"{Path(path).stem}.ort-optimized.onnx"
    session(path, optimized_model=optimized)
    counts = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    optimized.unlink()
    return dict(counts.most_common())


@torch.no_grad()
def compare(path: str | Path, net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> Agreement:
    """Outputs of the ONNX model at `path` in ONNX Runtime vs `net` (eval mode) on `images`, batch by batch."""
    runtime = session(path)
    fixed = runtime.get_inputs()[0].shape[0]
    if isinstance(fixed, int):  # an exporter that could not keep the batch dimension symbolic
        batch_size = fixed
    was_training = net.training
    net.eval()
    ours, theirs = [], []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].float().contiguous()
            theirs.append([t.float().numpy() for t in flat_outputs(net(batch))])
            count = len(batch)
            if isinstance(fixed, int) and count < fixed:  # pad the last batch, keep its own outputs
                batch = torch.cat([batch, batch[:1].expand(fixed - count, *batch.shape[1:])])
            ours.append([out[:count] for out in runtime.run(None, {INPUT_NAME: batch.numpy()})])
    finally:
        net.train(was_training)
    reference = [np.concatenate(parts) for parts in zip(*theirs, strict=True)]
    exported = [np.concatenate(parts) for parts in zip(*ours, strict=True)]
    names = [output.name for output in runtime.get_outputs()]
    outputs = tuple(OutputDifference(name, float(np.abs(a - b).max()), float(np.abs(a).max()))
                    for name, a, b in zip(names, reference, exported, strict=True))
    top1 = None
    if len(reference) == 1 and reference[0].ndim == 2:
        top1 = float((reference[0].argmax(1) == exported[0].argmax(1)).mean())
    detections = None
    if DETECTIONS_OUTPUT in names:
        at = names.index(DETECTIONS_OUTPUT)
        detections = detection_agreement(reference[at], exported[at])
    return Agreement(len(images), outputs, top1, detections)
