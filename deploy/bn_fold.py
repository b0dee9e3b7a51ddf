"""Fold inference BatchNormalization nodes into the Conv before them, in an exported ONNX graph.

BatchNorm after a convolution is a per-output-channel affine map `a * conv + b`, a = gamma / sqrt(var + eps).
For a quantized convolution, whose weight is DequantizeLinear(integers, scale), folding multiplies the
*scale* of each output channel by a and leaves the integers as they were: the folded graph has the same
b-bit weight levels up to a per-channel factor, and the quantized input is untouched, so the folded layer
computes what conv + BatchNorm computed up to float rounding. (A channel with negative a gets a negative
scale.) Float convolutions have their weights multiplied, as ONNX Runtime itself would do.

A BatchNorm is left in place, and named with the reason, where folding would change more than that layer:
its input is not a Conv, the Conv's output or its dequantized weight is also used elsewhere, or a parameter
is not a constant. Folding writes new initializers, so constants shared with other nodes stay as they were.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, helper

from deploy.onnx_graph import GraphIndex


def _layer_name(graph: GraphIndex, conv) -> str:
    """The module the Conv came from, read off its weight initializer's name (e.g. layer1.0.conv1)."""
    weight = conv.input[1]
    producer = graph.producers.get(weight)
    if producer is not None and producer.op_type == "DequantizeLinear":
        weight = producer.input[0]
    for suffix in (".weight_integers", ".weight"):
        if weight.endswith(suffix):
            return weight.removesuffix(suffix)
    return conv.name or weight


def _bn_name(graph: GraphIndex, bn) -> str:
    producer = graph.producers.get(bn.input[0])
    if producer is not None and producer.op_type == "Conv":
        return f"the BatchNorm after {_layer_name(graph, producer)}"
    return f"BatchNorm {bn.input[1].removesuffix('.weight')}"


def _why_not(graph: GraphIndex, bn) -> str | None:
    """None when `bn` can be folded into its Conv, else the reason it cannot."""
    if len(bn.output) != 1:
        return "it is in training mode"
    conv = graph.producers.get(bn.input[0])
    if conv is None or conv.op_type != "Conv":
        return f"its input comes from {conv.op_type if conv is not None else 'the graph input'}, not a Conv"
    if graph.only_consumer(conv.output[0]) is None:
        return "the Conv's output is also used elsewhere"
    if any(graph.constant(name) is None for name in bn.input[1:5]):
        return "its parameters are not constants"
    weight = conv.input[1]
    if graph.only_consumer(weight) is None:
        return "the Conv's weights are shared with another node"
    dq = graph.producers.get(weight)
    if dq is not None and dq.op_type == "DequantizeLinear":
        if any(graph.constant(name) is None for name in dq.input if name):
            return "the Conv's integer weights or their scale are not constants"
    elif graph.constant(weight) is None:
        return "the Conv's weights are not a constant"
    if len(conv.input) > 2 and conv.input[2] and graph.constant(conv.input[2]) is None:
        return "the Conv's bias is not a constant"
    return None


def _rank(conv) -> int:
    """Rank of the Conv's output: N, C and one dimension per kernel dimension."""
    kernel = next((a.ints for a in conv.attribute if a.name == "kernel_shape"), None)
    return 2 + (len(kernel) if kernel else 2)


def _fold(graph: GraphIndex, bn) -> None:
    conv = graph.producers[bn.input[0]]
    gamma, beta, mean, var = (graph.constant(name).astype(np.float64) for name in bn.input[1:5])
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    factor = gamma / np.sqrt(var + epsilon)
    channels = factor.shape[0]
    dq = graph.producers.get(conv.input[1])
    if dq is not None and dq.op_type == "DequantizeLinear":
        # Per channel along axis 0 from now on: the integers stay, each output channel's scale takes the factor.
        scale = graph.constant(dq.input[1]).astype(np.float64)
        scale = np.broadcast_to(scale, (channels,)) * factor
        dq.input[1] = graph.add_initializer(f"{dq.input[1]}_folded", scale.astype(np.float32))
        if len(dq.input) > 2 and dq.input[2]:
            zero_point = graph.constant(dq.input[2])
            zero_points = np.broadcast_to(zero_point, (channels,)).copy()
            dq.input[2] = graph.add_initializer(f"{dq.input[2]}_folded", zero_points)
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", 0))
    else:
        weight = graph.constant(conv.input[1]).astype(np.float64)
        folded = weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        conv.input[1] = graph.add_initializer(f"{conv.input[1]}_folded", folded.astype(np.float32))
    bias = graph.constant(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
    new_bias = (beta + (bias - mean) * factor).astype(np.float32).reshape(1, channels, *([1] * (_rank(conv) - 2)))
    bias_name = graph.add_initializer(f"{_layer_name(graph, conv)}.bias_folded", new_bias)
    del conv.input[2:]
    conv.output[0] = f"{bn.output[0]}_before_bias"
    add = helper.make_node("Add", [conv.output[0], bias_name], [bn.output[0]], name=f"{bn.name or bias_name}_bias")
    graph.graph.node.insert(list(graph.graph.node).index(bn), add)
    graph.graph.node.remove(bn)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def fold_batch_norms(model: ModelProto) -> tuple[list[str], list[tuple[str, str]]]:
    """Fold what can be folded, in place; returns (folded layer names, [(BatchNorm, why it stays)])."""
    folded, kept = [], []
    for bn in [node for node in model.graph.node if node.op_type == "BatchNormalization"]:
        graph = GraphIndex(model)  # rebuilt per fold: each fold rewires nodes and initializers
        reason = _why_not(graph, bn)
        if reason is None:
            folded.append(_layer_name(graph, graph.producers[bn.input[0]]))
            _fold(graph, bn)
        else:
            kept.append((_bn_name(graph, bn), reason))
    _drop_unused_initializers(model.graph)
    return folded, kept
