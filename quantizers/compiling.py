"""torch.compile for a quantized network, once its quantizers' data-dependent initialisation has run.

Some quantizers act once on their first training batch, on the host (LSQ activation steps are set from it,
PACT checks its inputs; `Quantizer.ready` is False until then). Compiled before that, dynamo traces the
one-off branch, breaks the graph there and re-guards every quantizer on its init flag and its input's shape,
recompiling per layer until it hits its recompile limit.
So the network runs eagerly until its quantizers are ready (the sanity check's eval batches, and the first
training batch, which initialises them), then switches to the compiled call for good: one graph for
training, one recompile for evaluation.

A library user who compiles the network themselves calls `prepare(net, batch)` first: the quantizers initialise
from that batch, everything else is left as it was, and `torch.compile(net)` then traces ready quantizers only.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizers.base import quantizers_in, unready_quantizers


def quantizers_ready(net: nn.Module) -> bool:
    """No quantizer of `net` still has a first-training-batch branch to take (`Quantizer.ready`)."""
    return not unready_quantizers(net)


@torch.no_grad()
def prepare(net: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Run the quantizers' first-training-batch initialisation on `inputs` (a batch of training inputs) and
    return `net`, ready for `torch.compile(net)`.

    One forward pass in training mode, without gradients; the network's other state is put back as it was: the
    BatchNorm running statistics and every buffer outside the quantizers, the random number generators, the
    train/eval mode. So the first real training step starts where it would have, and the quantizers hold what
    that step would have set (LSQ activation steps from `inputs`; PACT's input check done).
    """
    kept = {name: buffer.clone() for name, buffer in _buffers_outside_quantizers(net)}
    was_training = net.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        net.train()
        net(inputs)
    net.train(was_training)
    for name, buffer in _buffers_outside_quantizers(net):
        buffer.copy_(kept[name])
    return net


def _buffers_outside_quantizers(net: nn.Module):
    inside = {id(buffer) for _, quantizer in quantizers_in(net) for buffer in quantizer.buffers()}
    return [(name, buffer) for name, buffer in net.named_buffers() if id(buffer) not in inside]


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
