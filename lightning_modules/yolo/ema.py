"""Exponential moving average of the weights, as ultralytics validates (ModelEMA: decay 0.9999, tau 2000).

The average is a deep copy of the (already quantized) network, so LSQ step sizes and PACT alphas are
averaged like any weight. Non-float state (BatchNorm's batch counter, LSQ's `initialized` flag) is copied,
and each quantizer of the average is marked ready once its live twin is (`Quantizer.ready`), so an activation
quantizer initialised on the first training batch of the live network is initialised in the average too.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from quantizers import quantizers_in


class ModelEMA:
    """Keeps `ema` = an averaged copy of `model`; `update(model)` after each optimizer step.

    The decay ramps up as decay * (1 - exp(-updates / tau)), so early averages follow the weights closely.
    """

    def __init__(self, ema: nn.Module, decay: float = 0.9999, tau: float = 2000.0) -> None:
        self.ema = ema
        self.decay = decay
        self.tau = tau
        self.updates = 0
        self._readiness_synced = False

    @staticmethod
    def copy_of(model: nn.Module) -> nn.Module:
        ema = copy.deepcopy(model).eval()
        for parameter in ema.parameters():
            parameter.requires_grad_(False)
        return ema

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        averaged, live, copied, sources = [], [], [], []
        model_state = model.state_dict()
        for name, tensor in self.ema.state_dict().items():
            source = model_state[name]
            if tensor.is_floating_point():
                averaged.append(tensor)
                live.append(source.detach().to(tensor.dtype))
            else:
                copied.append(tensor)
                sources.append(source)
        if averaged:
            torch._foreach_lerp_(averaged, live, weight)
        for tensor, source in zip(copied, sources, strict=True):
            tensor.copy_(source)
        if not self._readiness_synced:
            self._sync_readiness(model)

    def _sync_readiness(self, model: nn.Module) -> None:
        live = dict(quantizers_in(model))
        averaged = dict(quantizers_in(self.ema))
        for name, mine in averaged.items():
            if live[name].ready and not mine.ready:
                mine.mark_ready()  # its state (the `initialized` buffer included) was just copied from the live one
        self._readiness_synced = all(mine.ready for mine in averaged.values())
