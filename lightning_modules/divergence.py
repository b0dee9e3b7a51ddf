"""Stop a run whose loss stops being finite, naming where it went bad."""

from __future__ import annotations

import torch
from torch import nn


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; a study records the cell as diverged and goes on."""


def first_non_finite(net: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN/inf; quantizer state (steps, alphas) comes first."""
    named = list(net.named_parameters()) + list(net.named_buffers())
    named.sort(key=lambda item: not any(k in item[0] for k in ("quantizer", "step", "alpha")))
    for name, tensor in named:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def check_finite_loss(module, loss: torch.Tensor) -> None:
    """Raise TrainingDiverged if `loss` is not finite (one host sync per step)."""
    if bool(torch.isfinite(loss)):
        return
    culprit = first_non_finite(module.net)
    where = (f"first non-finite tensor: {culprit}" if culprit
             else "every parameter is finite, so the forward pass itself overflowed")
    raise TrainingDiverged(
        f"training diverged at step {module.global_step} (epoch {module.current_epoch}): loss is "
        f"{loss.item()}; {where}; lower the learning rate or raise the bit width"
    )
