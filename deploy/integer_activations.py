"""The float ops between the integer convolutions of an `onnx-int8` graph, made integer ops too.

After `deploy.onnx_int8` has made the convolutions QLinearConv, what lies between them still runs in float: a
ResNet block's residual addition and ReLU, a YOLO block's SiLU (Sigmoid and Mul), its concatenations, max pools
and upsampling. Each dequantizes its inputs, computes in float and is quantized again; together they cost as
much as the integer convolutions save, and they break ONNX Runtime's channels-last integer layout (it
transposes every tensor into and out of them).

Here each such op whose operands are 8-bit integers (a DequantizeLinear of a constant per-tensor grid) runs on
the integers: Add, Mul, Sigmoid and Concat as ONNX Runtime's QLinearAdd / QLinearMul / QLinearSigmoid /
QLinearConcat, MaxPool and nearest Resize on the integers themselves. (Written out, not left to ONNX Runtime's
fusion of DequantizeLinear -> op -> QuantizeLinear, which fused a SiLU's two ops in some blocks and not in
others.) Where the output goes decides its grid:

- each quantizer reading it (`QuantizeLinear` on the same 8-bit type; where a ReLU comes first, a zero point
  at the bottom of the type, so saturation is the ReLU) gets a copy of the op that writes its integers
  directly: the rounding the trained model does, of an op whose operands are 8-bit;
- the readers that take it in float share one new 8-bit point, calibrated on training images as the
  convolutions' new points are, and integer ops further on read those integers; a sigmoid's point spans
  [0, 1], and a max pool or nearest upsampling keeps its input's grid (its outputs are input values).

A float operand that is not an integer op's output yet (the first ResNet block's shortcut reads the float
stem) is quantized to its own calibrated point. Every new point is a rounding the trained model does not have
(an identity shortcut now carries its block's input in 8 bits, a SiLU's sigmoid is 8-bit); the export's check
measures what they cost in agreement.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper

from deploy.new_points import calibrate, new_point_grid
from deploy.onnx_graph import (
    MICROSOFT,
    GraphIndex,
    drop_dead_nodes,
    import_microsoft_ops,
    replace_nodes,
    sort_topologically,
)

_STORAGE = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
# Ops whose outputs are some of their input's values: the input's grid holds them exactly.
GRID_KEEPING = ("MaxPool", "Resize")
# The ops run on integers here, and how many of their first inputs are data (the rest are constants).
_DATA_INPUTS = {"Add": 2, "Mul": 2, "Sigmoid": 1, "Concat": None, "MaxPool": 1, "Resize": 1}


@dataclass(frozen=True)
class Integers:
    """A tensor as 8-bit integers: their name, the names of their scale and zero point, and their type."""

    values: str
    scale: str
    zero_point: str
    storage: int  # TensorProto.UINT8 or INT8


def _grid_of(graph: GraphIndex, values: str, scale: str, zero_point: str) -> Integers | None:
    """`values` on a constant per-tensor 8-bit grid, else None."""
    scale_value, zero = graph.constant(scale), graph.initializers.get(zero_point)
    if scale_value is None or scale_value.ndim != 0 or zero is None or zero.data_type not in _STORAGE:
        return None
    return Integers(values, scale, zero_point, zero.data_type)


def _data_inputs(node) -> list[str]:
    count = _DATA_INPUTS[node.op_type]
    return list(node.input if count is None else node.input[:count])


def _wrappable(graph: GraphIndex, node) -> bool:
    if node.op_type not in _DATA_INPUTS:
        return False
    if node.op_type == "Resize":  # only nearest-neighbour resizing keeps the input's values
        mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"nearest")
        if mode != b"nearest":
            return False
    # Every operand computed (an op with a constant operand, e.g. a BatchNorm shift, is not between layers).
    return all(graph.constant(name) is None for name in _data_inputs(node))


def _block_name(graph: GraphIndex, node, depth: int = 6) -> str:
    """The layer an op follows, read off the nearest QLinearConv upstream (`layer1.0.conv2.qlinearconv` ->
    `layer1.0.conv2`), else the node's own name."""
    frontier = [node]
    for _ in range(depth):
        writers = [graph.producers.get(name) for n in frontier for name in n.input]
        writers = [w for w in writers if w is not None]
        for writer in writers:
            if writer.name.endswith(".qlinearconv"):
                return writer.name.removesuffix(".qlinearconv")
        frontier = writers
    return node.name or node.op_type


def _integer_op(node, operands: list[Integers], scale: str, zero_point: str, output: str, name: str):
    """`node` computed on `operands`' integers, writing integers on (scale, zero_point) to `output`."""
    flat = [part for x in operands for part in (x.values, x.scale, x.zero_point)]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Add", "Mul", "Sigmoid"):
        return helper.make_node(f"QLinear{node.op_type}", [*flat, scale, zero_point], [output], name=name,
                                domain=MICROSOFT)
    if node.op_type == "Concat":
        return helper.make_node("QLinearConcat", [scale, zero_point, *flat], [output], name=name,
                                domain=MICROSOFT, **attributes)
    # MaxPool, Resize: on the integers themselves (the output keeps the input's grid)
    return helper.make_node(node.op_type, [operands[0].values, *node.input[1:]], [output], name=name, **attributes)


class _Rewrite:
    """The rewrite's state: which float tensors are now carried as 8-bit integers (and on which grid), the
    nodes added and removed, and the route of each op."""

    def __init__(self, model: ModelProto, ranges: dict[str, tuple[float, float]], images: int) -> None:
        self.graph, self.ranges, self.images = GraphIndex(model), ranges, images
        self.carried: dict[str, Integers] = {}  # float tensor -> the integers it is the DequantizeLinear of
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and len(node.input) == 3:
                integers = _grid_of(self.graph, *node.input[:3])
                if integers is not None:
                    self.carried[node.output[0]] = integers
        self.added: list = []
        self.removed: set[int] = set()
        self.routes: list[tuple[str, str]] = []
        self.names: dict[str, int] = {}

    def new_grid(self, value: str, stem: str, low: float, high: float, storage: int) -> Integers:
        """A calibrated point for the float tensor `value` (its integers are named after it, its scale and zero
        point after `stem`)."""
        dtype = _STORAGE[storage]
        step, zero_point = new_point_grid(min(low, 0.0), max(high, 0.0), dtype)
        return Integers(f"{value}.integers", self.graph.add_initializer(f"{stem}.scale", np.array(step, np.float32)),
                        self.graph.add_initializer(f"{stem}.zero_point", np.array(zero_point, dtype)), storage)

    def describe(self, grid: Integers, low: float, high: float, source: str) -> str:
        scale = float(self.graph.constant(grid.scale))
        kind = "uint8" if grid.storage == TensorProto.UINT8 else "int8"
        return f"a new {kind} point, scale {scale:.4g} = range [{min(low, 0.0):.4g}, {max(high, 0.0):.4g}] {source}"

    @property
    def calibrated(self) -> str:
        return f"on {self.images} training images / 255"

    def operand(self, value: str, storage: int, block: str) -> Integers:
        """`value` as integers: those it is the DequantizeLinear of, else (a float operand from outside the
        integer ops) quantized here to a calibrated point of its own."""
        if value in self.carried:
            return self.carried[value]
        low, high = self.ranges[value]
        grid = self.new_grid(value, f"{block}.operand", low, high, storage)
        self.added.append(helper.make_node("QuantizeLinear", [value, grid.scale, grid.zero_point], [grid.values],
                                           name=f"{grid.values}.quantize"))
        self.carried[value] = grid
        self.routes.append((f"{block} operand", "a float input of an integer op, quantized to "
                            + self.describe(grid, low, high, self.calibrated)))
        return grid

    def wrap(self, node) -> None:
        data = _data_inputs(node)
        kinds = {self.carried[name].storage for name in data if name in self.carried}
        if len(kinds) != 1:  # no operand is integer yet, or they mix uint8 and int8 (a QLinear op takes one type)
            return
        storage = kinds.pop()
        block = _block_name(self.graph, node)
        name = f"{block} {node.op_type}"
        self.names[name] = self.names.get(name, 0) + 1
        name += f" {self.names[name]}" if self.names[name] > 1 else ""  # SPPF's three max pools, one block
        operands = [self.operand(value, storage, block) for value in data]
        keeps_grid = node.op_type in GRID_KEEPING
        relu = self.graph.only_consumer(node.output[0])
        relu = relu if relu is not None and relu.op_type == "Relu" and not keeps_grid else None
        value = (relu or node).output[0]
        bottom = int(np.iinfo(_STORAGE[storage]).min)

        quantizers, float_readers = [], value in self.graph.graph_outputs
        for reader in self.graph.consumers.get(value, []):
            grid = (_grid_of(self.graph, *reader.input[:3])
                    if reader.op_type == "QuantizeLinear" and len(reader.input) == 3 else None)
            if (grid is not None and grid.storage == storage and not keeps_grid
                    and (relu is None or int(self.graph.constant(grid.zero_point)) == bottom)):
                quantizers.append(reader)
            else:
                float_readers = True

        writes = []
        for i, quantizer in enumerate(quantizers):  # the quantizer's own integers, straight from the op
            self.added.append(_integer_op(node, operands, quantizer.input[1], quantizer.input[2],
                                          quantizer.output[0], f"{name} -> {quantizer.name or i}"))
            self.removed.add(id(quantizer))
            writes.append(f"{quantizer.input[1].removesuffix('.input_scale')}'s input integers")
        if float_readers:
            if keeps_grid:
                grid = Integers(f"{value}.integers", *astuple(operands[0])[1:])
                detail = "its input's grid (its outputs are input values)"
            else:
                low, high = (0.0, 1.0) if node.op_type == "Sigmoid" else self.ranges[value]
                low = max(low, 0.0) if relu is not None else low  # from 0: the saturation is the ReLU
                grid = self.new_grid(value, f"{block}.{node.op_type.lower()}_output", low, high, storage)
                detail = self.describe(grid, low, high, "(a sigmoid's)" if node.op_type == "Sigmoid"
                                       else self.calibrated)
            self.added.append(_integer_op(node, operands, grid.scale, grid.zero_point, grid.values, name))
            self.added.append(helper.make_node("DequantizeLinear", [grid.values, grid.scale, grid.zero_point],
                                               [value], name=f"{grid.values}.dequantize"))
            self.carried[value] = grid
            writes.append(f"{detail} for its float readers")
        self.removed.update(id(n) for n in (node, relu) if n is not None)
        relu_note = ", ReLU by saturation" if relu is not None else ""
        self.routes.append((name, f"{'QLinear' if not keeps_grid else ''}{node.op_type}{relu_note}; writes "
                            + "; ".join(writes)))


def _calibration_values(graph: GraphIndex, model: ModelProto) -> list[str]:
    """Every tensor a new point may be calibrated for: each wrappable op's operands and output (after its ReLU)."""
    values = set()
    for node in model.graph.node:
        if _wrappable(graph, node):
            values.update(_data_inputs(node))
            relu = graph.only_consumer(node.output[0])
            values.add((relu if relu is not None and relu.op_type == "Relu" else node).output[0])
    return sorted(v for v in values if graph.producers.get(v) is not None
                  and graph.producers[v].op_type != "DequantizeLinear")


def integer_activations(model: ModelProto, calibration: torch.Tensor) -> list[tuple[str, str]]:
    """Rewrite `model`'s float ops between integer tensors as described in the module's docstring; returns
    (op, what it now writes) for each. `calibration` is the training images that set the new points."""
    graph = GraphIndex(model)
    if not any(_wrappable(graph, node) for node in model.graph.node):
        return []
    rewrite = _Rewrite(model, calibrate(model, _calibration_values(graph, model), calibration), len(calibration))
    for node in list(model.graph.node):  # in topological order: an op's operands are rewritten before it
        if _wrappable(graph, node):
            rewrite.wrap(node)
    if not rewrite.routes:
        return []
    replace_nodes(model.graph, [n for n in model.graph.node if id(n) not in rewrite.removed] + rewrite.added)
    import_microsoft_ops(model)
    drop_dead_nodes(model)
    sort_topologically(model)
    return rewrite.routes
