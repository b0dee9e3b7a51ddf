"""The anchor-based YOLOv5 of YOLOv5 v7.0 (the paper's 2022 YOLOv5n), written here.

Architecture (YOLOv5 v7.0's yolov5*.yaml, scaled by depth/width multiples; n = 0.33 / 0.25):
  backbone  0 Conv 6x6/2, 1 Conv 3x3/2, 2 C3, 3 Conv/2, 4 C3 x2, 5 Conv/2, 6 C3 x3, 7 Conv/2, 8 C3, 9 SPPF
  neck (PAN) 10 Conv 1x1, 11 up, 12 cat(6), 13 C3, 14 Conv 1x1, 15 up, 16 cat(4), 17 C3 (P3/8),
            18 Conv/2, 19 cat(14), 20 C3 (P4/16), 21 Conv/2, 22 cat(10), 23 C3 (P5/32)
  24 Detect: one bare 1x1 conv per level, 3 anchors x (5 + classes) outputs (x, y, w, h, objectness, classes).

Module names follow YOLOv5 and ultralytics (`model.<i>.conv`, `model.24.m.<level>`), so layers 0-23 have the
same names and shapes as ultralytics' YOLOv5u and its weights load into them. Every `Conv` block owns its SiLU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# YOLOv5's default anchors in input pixels (width, height), 3 per level, for strides 8, 16, 32.
DEFAULT_ANCHORS = (
    ((10, 13), (16, 30), (33, 23)),
    ((30, 61), (62, 45), (59, 119)),
    ((116, 90), (156, 198), (373, 326)),
)
STRIDES = (8, 16, 32)
# (depth multiple, width multiple) of each size, as in yolov5{n,s,m,l,x}.yaml.
SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
DETECT_LAYER = 24
# The name an exported graph gives the decoded boxes (eval mode's first output, the layout NMS reads).
DETECTIONS_OUTPUT = "detections"
# YOLOv5 sets these on every BatchNorm (its initialize_weights).
BN_EPS, BN_MOMENTUM = 1e-3, 0.03


class Conv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 Conv, with a residual connection when asked and the widths agree."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c_in, c_out, 1)
        self.cv2 = Conv(c_out, c_out, 3)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with 3 convs: cv3(cat(bottlenecks(cv1(x)), cv2(x))), hidden width half the output."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        hidden = c_out // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(c_in, hidden, 1)
        self.cv3 = Conv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, concatenated with their input."""

    def __init__(self, c_in: int, c_out: int, k: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(hidden * 4, c_out, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, 1)


class AnchorDetect(nn.Module):
    """YOLOv5's anchor-based head: per level a bare 1x1 conv to anchors x (5 + classes) logits.

    Training mode returns the raw maps, each (B, anchors, H, W, 5 + classes). Eval mode returns
    `(decoded, raw)`: `decoded` is (B, 4 + classes, boxes) with boxes as cx, cy, w, h in input pixels and
    the class scores multiplied by objectness (objectness alone with one class, as YOLOv5's NMS does), the
    layout `non_max_suppression` reads.
    """

    def __init__(self, num_classes: int, channels: tuple[int, ...], anchors=DEFAULT_ANCHORS, strides=STRIDES):
        super().__init__()
        self.nc = num_classes
        self.no = num_classes + 5
        self.nl = len(anchors)
        self.na = len(anchors[0])
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)
        # Anchors in grid units of their level (pixels / stride), as the loss and the decoding use them.
        pixels = torch.tensor(anchors, dtype=torch.float32)
        self.register_buffer("anchors", pixels / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self._grids: dict[tuple[int, int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def initialize_biases(self) -> None:
        """YOLOv5's prior: objectness for about 8 objects per 640 px image, class probability 0.6 / classes."""
        with torch.no_grad():
            for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
                bias = conv.bias.view(self.na, -1)
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] += math.log(0.6 / (self.nc - 0.99999))

    def _grid(self, level: int, ny: int, nx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (level, ny, nx, like.device, like.dtype)
        if key not in self._grids:
            y, x = torch.meshgrid(torch.arange(ny, device=like.device, dtype=like.dtype),
                                  torch.arange(nx, device=like.device, dtype=like.dtype), indexing="ij")
            grid = torch.stack((x, y), 2).view(1, 1, ny, nx, 2)
            anchor = (self.anchors[level] * self.stride[level]).to(like).view(1, self.na, 1, 1, 2)
            self._grids[key] = (grid, anchor)
        return self._grids[key]

    def forward(self, features: list[torch.Tensor]):
        raw = []
        for conv, x in zip(self.m, features, strict=True):
            batch, _, ny, nx = x.shape
            raw.append(conv(x).view(batch, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        decoded = []
        for i, p in enumerate(raw):
            batch, _, ny, nx, _ = p.shape
            y = p.float().sigmoid()  # decoded in float32: bfloat16 would round 640 px boxes by several pixels
            grid, anchor = self._grid(i, ny, nx, y)
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor
            scores = y[..., 4:5] if self.nc == 1 else y[..., 5:] * y[..., 4:5]
            decoded.append(torch.cat((xy, wh, scores), -1).view(batch, -1, 4 + self.nc))
        return torch.cat(decoded, 1).transpose(1, 2), raw


class AnchorYOLOv5(nn.Module):
    """The anchor-based YOLOv5 (v7.0) of one size, with `model` numbered as in yolov5*.yaml."""

    def __init__(self, num_classes: int, scale: str = "n") -> None:
        super().__init__()
        depth, width = SCALES[scale]

        def c(channels: int) -> int:  # channels rounded up to a multiple of 8, as YOLOv5's make_divisible
            return math.ceil(channels * width / 8) * 8

        def n(repeats: int) -> int:
            return max(round(repeats * depth), 1)

        c64, c128, c256, c512, c1024 = c(64), c(128), c(256), c(512), c(1024)
        layers: list[tuple[int | tuple[int, ...], nn.Module]] = [
            (-1, Conv(3, c64, 6, 2, 2)),  # 0 P1/2
            (-1, Conv(c64, c128, 3, 2)),  # 1 P2/4
            (-1, C3(c128, c128, n(3))),
            (-1, Conv(c128, c256, 3, 2)),  # 3 P3/8
            (-1, C3(c256, c256, n(6))),
            (-1, Conv(c256, c512, 3, 2)),  # 5 P4/16
            (-1, C3(c512, c512, n(9))),
            (-1, Conv(c512, c1024, 3, 2)),  # 7 P5/32
            (-1, C3(c1024, c1024, n(3))),
            (-1, SPPF(c1024, c1024, 5)),  # 9
            (-1, Conv(c1024, c512, 1, 1)),  # 10
            (-1, nn.Upsample(scale_factor=2.0, mode="nearest")),
            ((-1, 6), Concat()),
            (-1, C3(2 * c512, c512, n(3), shortcut=False)),  # 13
            (-1, Conv(c512, c256, 1, 1)),  # 14
            (-1, nn.Upsample(scale_factor=2.0, mode="nearest")),
            ((-1, 4), Concat()),
            (-1, C3(2 * c256, c256, n(3), shortcut=False)),  # 17 P3/8 out
            (-1, Conv(c256, c256, 3, 2)),
            ((-1, 14), Concat()),
            (-1, C3(2 * c256, c512, n(3), shortcut=False)),  # 20 P4/16 out
            (-1, Conv(c512, c512, 3, 2)),
            ((-1, 10), Concat()),
            (-1, C3(2 * c512, c1024, n(3), shortcut=False)),  # 23 P5/32 out
            ((17, 20, 23), AnchorDetect(num_classes, (c256, c512, c1024))),  # 24
        ]
        self.sources = [source for source, _ in layers]
        self.model = nn.Sequential(*(module for _, module in layers))
        self.keep = {i for source in self.sources if isinstance(source, tuple) for i in source if i >= 0}
        self.nc = num_classes
        self.names = {i: f"class{i}" for i in range(num_classes)}
        self.detect.initialize_biases()

    @property
    def detect(self) -> AnchorDetect:
        return self.model[DETECT_LAYER]

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    @property
    def output_names(self) -> list[str]:
        """Names of the eval-mode outputs in order, for an exported graph: the decoded boxes NMS reads
        (`DETECTIONS_OUTPUT`, which `deploy.verify` compares after NMS), then each level's raw map."""
        return [DETECTIONS_OUTPUT] + [f"raw_stride{int(s)}" for s in self.detect.stride.tolist()]

    def forward(self, x: torch.Tensor):
        outputs: dict[int, torch.Tensor] = {}
        for i, (source, module) in enumerate(zip(self.sources, self.model, strict=True)):
            if isinstance(source, tuple):
                x = module([x if j == -1 else outputs[j] for j in source])
            else:
                x = module(x)
            if i in self.keep:
                outputs[i] = x
        return x
