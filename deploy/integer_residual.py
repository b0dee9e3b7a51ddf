"""The residual additions of an `onnx-int8` graph in integers: ONNX Runtime's QLinearAdd on the two 8-bit operands.

After `deploy.onnx_int8` has made the convolutions QLinearConv, a residual block still ends in float: the conv's
8-bit output is dequantized, added to the shortcut (a float tensor), passed through a ReLU and quantized again
for the next block. Those float ops cost as much as the integer convolutions save, and they break ONNX
Runtime's channels-last integer layout (it transposes every tensor into and out of them). Here each such
`Add -> [Relu]` becomes QLinearAdd (uint8 + uint8 -> uint8, ReLU by saturation at zero point 0), once per
reader:

- each quantizer reading the sum (`QuantizeLinear`, uint8, zero point 0) gets a QLinearAdd that writes its
  integers directly, at its scale: the rounding the trained model does, of a sum whose operands are 8-bit;
- the readers that take the sum in float (the next block's shortcut, the pooling) share one QLinearAdd that
  writes a new 8-bit point, its scale calibrated on training images like the convolutions' new points, and
  the next residual addition reads those integers directly.

An identity shortcut thereby carries its block's input as 8-bit integers where training carried it in float:
a new rounding point, one per block, whose cost in agreement the export's check measures (as it does for the
convolutions' new points). A float operand that is not the output of an integer op yet (the first block's
shortcut reads the float stem) gets a QuantizeLinear to its own calibrated 8-bit point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper

from deploy.new_points import calibrate, new_point_grid
from deploy.onnx_graph import GraphIndex, drop_dead_nodes, replace_nodes, sort_topologically

MICROSOFT = "com.microsoft"  # QLinearAdd is one of ONNX Runtime's contrib ops


@dataclass(frozen=True)
class Integers:
    """A tensor held as 8-bit integers: their name, and the names of their scale and zero point."""

    values: str
    scale: str
    zero_point: str


@dataclass
class _Residual:
    """One float residual addition to rewrite: the Add, its ReLU, and who reads the sum."""

    add: object
    relu: object | None
    name: str
    value: str  # the float sum (after the ReLU)
    quantizers: list = field(default_factory=list)  # QuantizeLinear readers given their integers directly
    float_readers: bool = False  # something else reads the sum: it needs a new 8-bit point


def _eight_bit(graph: GraphIndex, scale: str, zero_point: str) -> bool:
    """A constant per-tensor uint8 grid (what QLinearAdd here reads and writes)."""
    scale_value, zero = graph.constant(scale), graph.initializers.get(zero_point)
    return (scale_value is not None and scale_value.ndim == 0 and zero is not None
            and zero.data_type == TensorProto.UINT8)


def _integer_source(graph: GraphIndex, value: str) -> Integers | None:
    """`value` as the DequantizeLinear of uint8 integers on a constant per-tensor grid, else None."""
    dequantize = graph.producer(value, "DequantizeLinear")
    if dequantize is None or len(dequantize.input) < 3 or not _eight_bit(graph, *dequantize.input[1:3]):
        return None
    return Integers(*dequantize.input[:3])


def _block_name(graph: GraphIndex, add) -> str:
    """The residual block an Add closes, read off the layer that writes one of its operands
    (`layer1.0.conv2.qlinearconv` -> `layer1.0`)."""
    for value in add.input:
        dequantize = graph.producer(value, "DequantizeLinear")
        writer = graph.producers.get(dequantize.input[0]) if dequantize is not None else None
        if writer is not None and writer.name.endswith(".qlinearconv"):
            return writer.name.removesuffix(".qlinearconv").rsplit(".", 1)[0]
    return add.name or "add"


def _residuals(graph: GraphIndex, model: ModelProto) -> list[_Residual]:
    """The float additions of two computed tensors, at least one of them already 8-bit integers."""
    found = []
    for add in model.graph.node:
        if add.op_type != "Add" or len(add.input) != 2 or any(graph.constant(v) is not None for v in add.input):
            continue
        if all(_integer_source(graph, v) is None for v in add.input):
            continue
        relu = graph.only_consumer(add.output[0])
        relu = relu if relu is not None and relu.op_type == "Relu" else None
        value = relu.output[0] if relu is not None else add.output[0]
        residual = _Residual(add, relu, _block_name(graph, add), value)
        for reader in graph.consumers.get(value, []):
            # uint8 at zero point 0 saturates at 0, so the quantizer's integers need the ReLU (or no ReLU at all:
            # then saturation is what QuantizeLinear itself does).
            if (reader.op_type == "QuantizeLinear" and len(reader.input) == 3 and _eight_bit(graph, *reader.input[1:3])
                    and (relu is None or not graph.constant(reader.input[2]).any())):
                residual.quantizers.append(reader)
            else:
                residual.float_readers = True
        residual.float_readers |= value in graph.graph_outputs
        found.append(residual)
    return found


def _calibrated_grid(graph: GraphIndex, stem: str, low: float, high: float) -> Integers:
    """A new uint8 point spanning [low, high] (widened to hold 0), as initializers named after `stem`."""
    step, zero_point = new_point_grid(min(low, 0.0), max(high, 0.0), np.uint8)
    scale = graph.add_initializer(f"{stem}.scale", np.array(step, dtype=np.float32))
    zero = graph.add_initializer(f"{stem}.zero_point", np.array(zero_point, dtype=np.uint8))
    return Integers(f"{stem}.integers", scale, zero)


def integer_residuals(model: ModelProto, calibration: torch.Tensor) -> list[tuple[str, str]]:
    """Rewrite `model`'s float residual additions as QLinearAdd (see the module's docstring); returns (block,
    what its addition now writes) for each. `calibration` is the training images that set the new points."""
    graph = GraphIndex(model)
    residuals = _residuals(graph, model)
    if not residuals:
        return []
    to_calibrate = {r.value for r in residuals if r.float_readers}
    for residual in residuals:  # float operands that no integer op writes (the first block's shortcut)
        to_calibrate.update(v for v in residual.add.input if _integer_source(graph, v) is None)
    ranges = calibrate(model, sorted(to_calibrate), calibration)

    carriers: dict[str, Integers] = {}  # float tensor -> the 8-bit point that now carries it
    removed, added, described = set(), [], []

    def operand(value: str, block: str) -> Integers:
        source = _integer_source(graph, value) or carriers.get(value)
        if source is None:  # a float tensor from outside the integer graph: quantized to its own new point
            source = _calibrated_grid(graph, f"{block}.shortcut_input", *ranges[value])
            added.append(helper.make_node("QuantizeLinear", [value, source.scale, source.zero_point],
                                          [source.values], name=f"{block}.quantize_shortcut_input"))
            carriers[value] = source
        return source

    for residual in residuals:
        left, right = (operand(value, residual.name) for value in residual.add.input)
        inputs = [left.values, left.scale, left.zero_point, right.values, right.scale, right.zero_point]
        writes = []
        for quantizer in residual.quantizers:
            added.append(helper.make_node("QLinearAdd", [*inputs, quantizer.input[1], quantizer.input[2]],
                                          [quantizer.output[0]], name=f"{quantizer.name or residual.name}.qlinearadd",
                                          domain=MICROSOFT))
            removed.add(id(quantizer))
            writes.append(f"{quantizer.input[1].removesuffix('.input_scale')}'s input integers")
        if residual.float_readers:
            low, high = ranges[residual.value]
            carrier = _calibrated_grid(graph, f"{residual.name}.output", 0.0 if residual.relu else low, high)
            added.append(helper.make_node("QLinearAdd", [*inputs, carrier.scale, carrier.zero_point],
                                          [carrier.values], name=f"{residual.name}.output_qlinearadd",
                                          domain=MICROSOFT))
            added.append(helper.make_node("DequantizeLinear", [carrier.values, carrier.scale, carrier.zero_point],
                                          [residual.value], name=f"{residual.name}.dequantize_output"))
            carriers[residual.value] = carrier
            writes.append(f"a new uint8 point for its float readers, scale {float(graph.constant(carrier.scale)):.4g}"
                          f" = range [0, {high:.4g}] on {len(calibration)} training images / 255")
        removed.update(id(n) for n in (residual.add, residual.relu) if n is not None)
        relu_note = ", ReLU by saturation" if residual.relu is not None else ""
        described.append((residual.name, f"QLinearAdd{relu_note}; writes " + "; ".join(writes)))
    replace_nodes(model.graph, [node for node in model.graph.node if id(node) not in removed] + added)
    if not any(entry.domain == MICROSOFT for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
    drop_dead_nodes(model)
    sort_topologically(model)
    return described
