"""The loss of the anchor-based YOLOv5 (v7.0), written here from its published definition.

- Assignment: a target goes to every anchor of every level whose width and height ratios to the target are
  both within `anchor_t` (4.0; max(r, 1/r) < anchor_t), in the cell holding its centre and in the two
  neighbouring cells whose borders the centre is nearest to (within half a cell); so up to 3 cells x 3
  anchors per level.
- Box: CIoU between the decoded prediction (xy = 2 sigmoid - 0.5 from the cell corner, wh = anchor x
  (2 sigmoid)^2, in grid units) and the target; mean of 1 - CIoU over assigned anchors.
- Objectness: BCE over every anchor of a level against 0, or against the (detached, clamped at 0) CIoU of the
  assigned prediction; the levels weighted 4.0, 1.0, 0.4 (P3, P4, P5).
- Class: BCE against one-hot targets over the assigned anchors (none with a single class).
- Gains (hyp.scratch-low: box 0.05, obj 1.0, cls 0.5), scaled as YOLOv5's train.py does: box x 3 / levels,
  cls x classes / 80 x 3 / levels, obj x (image size / 640)^2 x 3 / levels.
Returned as ultralytics' criteria do: (the three gained parts x batch size, {name: part}), so the batch's
summed loss is what is backpropagated.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert, complete_box_iou_loss

from lightning_modules.yolo.anchor_model import AnchorDetect

# hyp.scratch-low.yaml of YOLOv5 v7.0 (training from scratch).
BOX_GAIN, OBJ_GAIN, CLS_GAIN = 0.05, 1.0, 0.5
ANCHOR_T = 4.0
OBJ_BALANCE = (4.0, 1.0, 0.4)
LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")
# The cell of the centre, then the neighbours left, up, right, down (in units of half a cell).
_NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


class AnchorYOLOLoss:
    """YOLOv5's ComputeLoss for `AnchorDetect`; call with the raw maps (or the eval-mode tuple) and a batch."""

    def __init__(self, detect: AnchorDetect, box: float = BOX_GAIN, obj: float = OBJ_GAIN, cls: float = CLS_GAIN,
                 anchor_t: float = ANCHOR_T, balance: tuple[float, ...] = OBJ_BALANCE) -> None:
        if len(balance) != detect.nl:
            raise ValueError(f"{len(balance)} objectness weights for {detect.nl} levels")
        self.detect = detect
        self.first_stride = int(detect.stride[0])  # read once: a device buffer read per step is a host sync
        self.box, self.obj, self.cls = box, obj, cls
        self.anchor_t = anchor_t
        self.balance = balance
        self.bce = nn.BCEWithLogitsLoss()

    def gains(self, image_size: int) -> tuple[float, float, float]:
        """(box, obj, cls) gains after YOLOv5's scaling by levels, classes and image size."""
        levels = 3 / self.detect.nl
        return (self.box * levels, self.obj * (image_size / 640) ** 2 * levels,
                self.cls * self.detect.nc / 80 * levels)

    def __call__(self, preds, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw = preds[1] if isinstance(preds, tuple) else preds
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"].view(-1, 4)),
                            1).to(raw[0].device, torch.float32)  # assignment in float32 whatever autocast does
        image_size = raw[0].shape[3] * self.first_stride
        box_gain, obj_gain, cls_gain = self.gains(image_size)
        device = raw[0].device
        lbox, lobj, lcls = (torch.zeros((), device=device) for _ in range(3))
        for level, p in enumerate(raw):
            images, anchors, gj, gi, target_box, target_cls = self.assign(level, p.shape, targets)
            target_obj = torch.zeros(p.shape[:4], dtype=torch.float32, device=device)
            if len(images):
                chosen = p[images, anchors, gj, gi].float()
                pxy = chosen[:, :2].sigmoid() * 2 - 0.5
                pwh = (chosen[:, 2:4].sigmoid() * 2) ** 2 * self.detect.anchors[level][anchors]
                predicted = box_convert(torch.cat((pxy, pwh), 1), "cxcywh", "xyxy")
                ciou_loss = complete_box_iou_loss(predicted, box_convert(target_box, "cxcywh", "xyxy"))
                lbox = lbox + ciou_loss.mean()
                target_obj[images, anchors, gj, gi] = (1.0 - ciou_loss).detach().clamp(0)
                if self.detect.nc > 1:
                    one_hot = torch.zeros_like(chosen[:, 5:])
                    one_hot[torch.arange(len(target_cls), device=device), target_cls] = 1.0
                    lcls = lcls + self.bce(chosen[:, 5:], one_hot)
            lobj = lobj + self.bce(p[..., 4].float(), target_obj) * self.balance[level]
        parts = torch.stack((lbox * box_gain, lobj * obj_gain, lcls * cls_gain))
        return parts * raw[0].shape[0], dict(zip(LOSS_NAMES, parts.detach(), strict=True))

    def assign(self, level: int, shape: torch.Size, targets: torch.Tensor):
        """The anchors of one level that learn each target.

        Returns image index, anchor index, cell row, cell column, the target box (cx, cy relative to that
        cell's corner, w, h; grid units) and class, one row per (target, anchor, cell) match.
        """
        device = targets.device
        anchors = self.detect.anchors[level].to(targets)  # (na, 2), grid units
        ny, nx = shape[2], shape[3]
        scale = torch.tensor([nx, ny, nx, ny], device=device, dtype=targets.dtype)
        boxes = targets[:, 2:6] * scale  # grid units
        # Every (anchor, target) pair whose shapes agree within anchor_t.
        ratio = boxes[None, :, 2:4] / anchors[:, None]
        anchor_idx, target_idx = (torch.max(ratio, 1 / ratio).max(2).values < self.anchor_t).nonzero(as_tuple=True)
        xy = boxes[target_idx, :2]
        inverse = scale[:2] - xy
        half = 0.5
        near = ((xy % 1 < half) & (xy > 1)).T  # nearer the left / top border, not in the first cell
        far = ((inverse % 1 < half) & (inverse > 1)).T  # nearer the right / bottom border, not in the last
        use = torch.stack((torch.ones_like(near[0]), near[0], near[1], far[0], far[1]))  # (5, matches)
        offsets = torch.tensor(_NEIGHBOUR_OFFSETS, device=device, dtype=targets.dtype) * half
        which, match = use.nonzero(as_tuple=True)
        anchor_idx, target_idx = anchor_idx[match], target_idx[match]
        xy = xy[match]
        cell = (xy - offsets[which]).long()
        gi, gj = cell[:, 0].clamp(0, nx - 1), cell[:, 1].clamp(0, ny - 1)
        target_box = torch.cat((xy - cell, boxes[target_idx, 2:4]), 1)
        return (targets[target_idx, 0].long(), anchor_idx, gj, gi, target_box, targets[target_idx, 1].long())
