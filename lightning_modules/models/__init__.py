"""Named model builders for 32x32 classification: `build_model("resnet20", num_classes=10)`."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from lightning_modules.models.mobilenet_v1 import MobileNetV1
from lightning_modules.models.resnet20 import ResNet20
from user_errors import UserError


def _cifar_stem(model: torchvision.models.ResNet) -> torchvision.models.ResNet:
    """torchvision's ResNet with the usual 32x32 stem: a 3x3 stride-1 conv and no max-pool."""
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda num_classes: ResNet20(num_classes),
    "resnet18": lambda num_classes: _cifar_stem(torchvision.models.resnet18(num_classes=num_classes)),
    "resnet50": lambda num_classes: _cifar_stem(torchvision.models.resnet50(num_classes=num_classes)),
    "mobilenetv1": lambda num_classes: MobileNetV1(num_classes),
}


class UnknownModelError(UserError):
    """A model name the registry does not know."""


def build_model(name: str, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes)
