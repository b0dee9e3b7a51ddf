"""Conv2d / Linear with a weight quantizer and an input-activation quantizer.

They subclass the float layers and keep the very same weight and bias Parameters, so a swapped model has the
float model's state_dict keys plus the quantizers' (`<layer>.weight_quantizer.step`, ...), and code that
checks `isinstance(m, nn.Conv2d)` keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init


def _adopt(float_layer: nn.Module, layer: nn.Module, weight_quantizer, input_quantizer) -> nn.Module:
    layer.weight = float_layer.weight
    layer.bias = float_layer.bias
    layer.weight_quantizer = weight_quantizer
    layer.input_quantizer = input_quantizer
    return layer.train(float_layer.training)


class QuantConv2d(nn.Conv2d):
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight_quantizer: nn.Module | None, input_quantizer: nn.Module | None
    ) -> QuantConv2d:
        # skip_init: no second weight initialisation, and no draw from the global RNG, so an FP32 and a
        # quantized run with the same seed see the same data order and augmentation.
        layer = skip_init(
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        return _adopt(conv, layer, weight_quantizer, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(nn.Linear):
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None

    @classmethod
    def from_float(
        cls, linear: nn.Linear, weight_quantizer: nn.Module | None, input_quantizer: nn.Module | None
    ) -> QuantLinear:
        layer = skip_init(
            cls, linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        return _adopt(linear, layer, weight_quantizer, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(x, weight, self.bias)


QUANTIZED_LAYERS = (QuantConv2d, QuantLinear)
