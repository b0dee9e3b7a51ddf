"""torch.compile for a quantized network, once its quantizers' data-dependent initialisation has run.

Some quantizers act once on their first training batch, on the host (LSQ activation steps are set from it,
PACT checks its inputs; `Quantizer.ready` is False until then). Compiled before that, dynamo traces the
one-off branch, breaks the graph there and re-guards every quantizer on its init flag and its input's shape,
recompiling per layer until it hits its recompile limit.
So the network runs eagerly until its quantizers are ready (the sanity check's eval batches, and the first
training batch, which initialises them), then switches to the compiled call for good: one graph for
training, one recompile for evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizers.base import Quantizer


def quantizers_ready(net: nn.Module) -> bool:
    """No quantizer of `net` still has a first-training-batch branch to take (`Quantizer.ready`)."""
    return all(module.ready for module in net.modules() if isinstance(module, Quantizer))


def compile_after_initialization(net: nn.Module, **compile_options) -> None:
    """Like `net.compile(**compile_options)`, but calls run eagerly until the quantizers are initialised."""
    compiled = torch.compile(net._call_impl, **compile_options)

    def call(*args, **kwargs):
        if quantizers_ready(net):
            net._compiled_call_impl = compiled
            return compiled(*args, **kwargs)
        out = net._call_impl(*args, **kwargs)
        if net.training:  # the first training batch initialised everything it reaches; the rest never will be
            net._compiled_call_impl = compiled
        return out

    net._compiled_call_impl = call
