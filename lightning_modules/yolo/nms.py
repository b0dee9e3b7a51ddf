"""Non-maximum suppression without a time limit, and the undoing of the letterbox.

ultralytics' `non_max_suppression` silently stops after `2 + max_time_img * batch` seconds and returns empty
detections for the rest of the batch: on CPU, or with an untrained or low-bit model that scores many boxes
above the 0.001 threshold, that would quietly lower mAP. This version always finishes (torchvision's
`batched_nms`), with ultralytics' validation settings: multi-label, confidence 0.001, IoU 0.7.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms


def _xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    xy, wh = boxes[:, :2], boxes[:, 2:4] / 2
    return torch.cat((xy - wh, xy + wh), dim=1)


@torch.no_grad()
def non_max_suppression(
    prediction: torch.Tensor,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.7,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> list[torch.Tensor]:
    """Per image, rows [x1, y1, x2, y2, score, class] in network-input pixels.

    Args:
        prediction: the eval-mode output of the Detect head, (B, 4 + num_classes, anchors), boxes as cx, cy, w, h.
        conf_threshold: minimum class score of a candidate (every class above it is a candidate: multi-label).
        iou_threshold: boxes of the same class overlapping more than this are suppressed.
        max_det: detections kept per image, best first.
        max_candidates: the highest-scoring candidates that enter NMS (ultralytics' max_nms).
    """
    output = []
    for image in prediction.transpose(1, 2):  # (anchors, 4 + nc)
        boxes, scores = _xywh_to_xyxy(image[:, :4]), image[:, 4:]
        anchor, label = (scores > conf_threshold).nonzero(as_tuple=True)
        score = scores[anchor, label]
        if score.numel() > max_candidates:
            top = score.topk(max_candidates).indices
            anchor, label, score = anchor[top], label[top], score[top]
        candidates = boxes[anchor].float()
        keep = batched_nms(candidates, score.float(), label, iou_threshold)[:max_det]
        output.append(torch.cat((candidates[keep], score[keep, None].float(), label[keep, None].float()), dim=1))
    return output


def to_original_coordinates(boxes: torch.Tensor, ratio_pad: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Undo the letterbox: network-input pixels -> pixels of the original image, clipped to it.

    `ratio_pad` is (scale, pad_x, pad_y) as the dataset recorded it, `shape` the original (height, width).
    """
    scale, pad_x, pad_y = ratio_pad.tolist()
    height, width = shape.tolist()
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad_x) / scale).clamp(0, width)
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad_y) / scale).clamp(0, height)
    return out
