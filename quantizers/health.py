"""Is a quantized layer still alive? How much of its weight tensor its quantizer puts on a single level.

A layer whose quantized weights all take one value (all zero, typically: an LSQ step grown past every weight)
computes a constant: the network behind it is dead, however finite its loss. Below the threshold a layer may
be sparse or coarse, but it still carries information.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizers.layers import QUANTIZED_LAYERS

# A layer with at least this share of its weights on one quantization level is collapsed. Legitimate layers stay
# far below it: LSQ's 2-bit initialisation puts about 60 % of the weights at zero, and 8 bits far fewer.
COLLAPSED_LEVEL_SHARE = 0.99


@torch.no_grad()
def dominant_level_share(layer: nn.Module) -> float:
    """The share of `layer`'s quantized weights (in [0, 1]) that sit on its most common level."""
    quantizer = layer.weight_quantizer
    was_training = quantizer.training
    quantizer.eval()  # a noise-injecting or lazily initialising quantizer must not change the weights it reports on
    try:
        levels = quantizer(layer.weight.detach()).flatten()
    finally:
        quantizer.train(was_training)
    _, counts = torch.unique(levels, return_counts=True)
    return float(counts.max()) / levels.numel()


def collapsed_layers(model: nn.Module, threshold: float = COLLAPSED_LEVEL_SHARE) -> dict[str, float]:
    """Quantized layers whose weights sit on one level for at least `threshold` of their elements: name -> share."""
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QUANTIZED_LAYERS) and layer.weight_quantizer is not None:
            share = dominant_level_share(layer)
            if share >= threshold:
                found[name] = share
    return found
