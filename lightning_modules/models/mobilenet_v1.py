"""MobileNetV1 (Howard et al. 2017) for 32x32 inputs: the ImageNet layer stack with the stem at stride 1 and
one fewer downsampling stage, so the last feature map is 2x2 instead of collapsing to 1x1 early."""

from __future__ import annotations

import torch
from torch import nn

# (output channels, stride) of the depthwise-separable blocks after the 3x3 stem (32 channels, stride 1).
_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        stem = int(32 * width)
        layers, in_channels = [_conv_bn_relu(3, stem, 3, 1)], stem
        for channels, stride in _BLOCKS:
            channels = int(channels * width)
            layers.append(_conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels))  # depthwise
            layers.append(_conv_bn_relu(in_channels, channels, 1, 1))  # pointwise
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
