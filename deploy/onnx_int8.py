"""`--format onnx-int8`: the QDQ export rewritten so that its quantized convolutions run as QLinearConv.

ONNX Runtime's CPU provider runs the exact QDQ graph (`deploy.onnx_qdq`) as DequantizeLinear + float Conv: a
QDQ Conv only becomes an integer kernel when its output is requantized, which the trained model never does
(BatchNorm, ReLU and residual additions run in float). This form starts from that graph with BatchNorm folded
(`deploy.bn_fold`: the integers as trained, each output channel's scale times BatchNorm's factor, its shift a
separate Add) and replaces each Conv whose input and weights are 8-bit-storable integers by a QLinearConv
(uint8 input x int8 weights, int32 accumulation, the shift as an int32 bias, output requantized to 8 bits;
every activation grid is stored in uint8 first, `store_grids_as_uint8`).
Where its output goes decides the output's grid, one of two *routes*:

- **requantized**: the Conv's output reaches the next quantized layer's input quantizer only through its
  BatchNorm shift and a ReLU (Conv -> Add -> [Relu] -> QuantizeLinear, nothing else reading the tensors on the
  way). The QLinearConv then writes that quantizer's integers directly: its output scale is the quantizer's
  step, the saturation at the lowest zero point is the ReLU, and the Clip to the b-bit grid stays as it was. These
  are the levels the trained model computes; only float rounding near a level boundary (and the shift rounded
  to the accumulator's int32 step) separates them.
- **new 8-bit point**: the output also enters something in float (a residual addition, pooling, a graph
  output). The QLinearConv writes 256 levels spanning the range the exact graph computes on training images
  (asymmetric: scale (max - min) / 255 with a zero point; the range always holds 0, and starts at 0 where a
  ReLU is taken in), and a DequantizeLinear hands the float on as before. This is a rounding the trained model
  does not have; its cost in agreement is what the export's check measures.

With new points, the float ops those outputs enter (residual additions and ReLUs, SiLUs, concatenations, max
pools, upsampling) run on integers too (`deploy.integer_activations`: each writes the next quantizer's
integers, or a new 8-bit point for its float readers), so the network stays in ONNX Runtime's channels-last
integer layout from one convolution to the next. That layout is then written into the file
(`deploy.channels_last`): ONNX Runtime's own transformer left ResNet20's first stage in NCHW with a Transpose
around every conv.

What stays as in the QDQ graph, and why, is reported per layer: a layer whose input is not quantized (the first
layer reads the float image, unless the image is 8-bit pixels / 255: `read_image_levels`), weights that need
int16 (DoReFa at 8 bits), a conv whose output is the network's (a detector's raw maps), and Linear layers (a
64 x 10 Gemm costs nothing next to the convolutions, and QLinearMatMul would round the logits to 8 bits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from onnx import ModelProto, TensorProto, helper
from torch import nn

from deploy.channels_last import lay_out_channels_last
from deploy.errors import ExportError
from deploy.integer_activations import integer_activations
from deploy.new_points import calibrate, new_point_grid
from deploy.onnx_graph import GraphIndex, drop_dead_nodes, replace_nodes, sort_topologically
from deploy.onnx_qdq import INPUT_NAME, OnnxExport, qdq_model, write_model
from deploy.requantize import exact_bias

REQUANTIZED, NEW_POINT, INTEGER_OP, KEPT = "requantized", "new 8-bit point", "integer op", "kept as QDQ"
IMAGE_LEVELS = "image as integers"
_EIGHT_BIT = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class LayerRoute:
    """How one quantized layer runs in the int8 graph."""

    name: str
    route: str  # REQUANTIZED, NEW_POINT or KEPT
    detail: str  # the output grid and where its scale comes from, or why the layer stayed as it was

    def describe(self) -> str:
        return f"{self.name}: {self.route} ({self.detail})"


@dataclass
class Int8Export(OnnxExport):
    """The QDQ export's report, and each quantized layer's route."""

    routes: list[LayerRoute] = field(default_factory=list)
    channels_last_ops: int = 0  # integer ops written channels-last (deploy.channels_last)

    def route_summary(self) -> str:
        """e.g. '10 requantized, 11 new 8-bit point, 2 kept as QDQ'."""
        counts = {route: sum(1 for r in self.routes if r.route == route)
                  for route in (IMAGE_LEVELS, REQUANTIZED, NEW_POINT, INTEGER_OP, KEPT)}
        return ", ".join(f"{n} {route}" for route, n in counts.items() if n)


@dataclass
class _Plan:
    """One Conv to replace: its quantized input and weights, the nodes its output passes through, and its route."""

    conv: object
    name: str
    input_dq: object
    weight_dq: object
    bias_add: object | None  # the folded BatchNorm shift
    relu: object | None  # taken into the output's saturation
    quantize: object | None  # requantized route: the next layer's QuantizeLinear
    value: str  # the float tensor the replaced nodes ended in (new 8-bit point: what the DequantizeLinear writes)
    storage: int  # the 8-bit type of its input, which is also the type of its output (TensorProto.UINT8 / INT8)


def _layer_name(conv, weight_dq) -> str:
    return weight_dq.input[0].removesuffix(".weight_integers") if weight_dq is not None else (conv.name or "conv")


def _quantizer_name(quantize) -> str:
    """The layer a QuantizeLinear quantizes the input of, read off its scale's name (`<layer>.input_scale`)."""
    return quantize.input[1].removesuffix(".input_scale")


def _zero_point_type(graph: GraphIndex, node) -> int | None:
    """The 8-bit integer type a QuantizeLinear / DequantizeLinear works in (its constant zero point's), else
    None."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    tensor = graph.initializers.get(node.input[2])
    if tensor is None or tensor.data_type not in _EIGHT_BIT or graph.constant(node.input[2]).ndim:
        return None
    return tensor.data_type


def _zero_point(graph: GraphIndex, node) -> int:
    return int(graph.constant(node.input[2]))


def store_grids_as_uint8(model: ModelProto) -> None:
    """Store every activation grid the QDQ export keeps in int8 (QuantizeLinear -> [Clip ->] DequantizeLinear)
    in uint8, the same levels: an unsigned grid ([0, 2^b-1], LSQ's unsigned activations) at zero point 0, a
    signed one (zero point z, the YOLO policy's signed activations) at z + 128. uint8 activations are what ONNX
    Runtime's fast integer convolution takes (uint8 x int8; with int8 activations the detector's QLinearConvs
    ran 4x slower than its float convs), and a uint8 output at zero point 0 is a ReLU by saturation."""
    graph = GraphIndex(model)
    made: dict[int, str] = {}

    def constant(value: int) -> str:
        if value not in made:
            made[value] = graph.add_initializer(f"uint8_grid_{value}", np.array(value, dtype=np.uint8))
        return made[value]

    for quantize in [node for node in model.graph.node if node.op_type == "QuantizeLinear"]:
        if _zero_point_type(graph, quantize) != TensorProto.INT8:
            continue
        clip = graph.only_consumer(quantize.output[0])
        if clip is not None and clip.op_type == "Clip":
            names = [*clip.input[1:3], "", ""][:2]  # a Clip's bounds are optional inputs
            low, high = (graph.constant(name) if name else None for name in names)
            if low is None or high is None:
                continue
            low, high, integers = int(low), int(high), clip.output[0]
        else:  # 8 bits: the grid is the type's whole range, no Clip
            clip, low, high, integers = None, -128, 127, quantize.output[0]
        readers = graph.consumers.get(integers, [])
        if (not readers or integers in graph.graph_outputs
                or any(reader.op_type != "DequantizeLinear" for reader in readers)):
            continue
        shift = 0 if low >= 0 else 128  # an unsigned grid fits uint8 as it is
        zero_point = constant(_zero_point(graph, quantize) + shift)
        quantize.input[2] = zero_point
        if clip is not None:
            clip.input[1], clip.input[2] = constant(low + shift), constant(high + shift)
        for dequantize in readers:
            dequantize.input[2] = zero_point


def _why_kept(graph: GraphIndex, conv) -> str | None:
    """None when `conv` can run as QLinearConv, else why it stays DequantizeLinear + float Conv."""
    input_dq = graph.producer(conv.input[0], "DequantizeLinear")
    if input_dq is None:
        return "its input is not quantized (float Conv on DequantizeLinear weights)"
    if _zero_point_type(graph, input_dq) is None or graph.constant(input_dq.input[1]) is None:
        return "its input is not on a constant per-tensor 8-bit grid"
    if graph.constant(input_dq.input[1]).ndim:
        return "its input has a per-channel scale"
    weight_dq = graph.producer(conv.input[1], "DequantizeLinear")
    weights = None if weight_dq is None else graph.initializers.get(weight_dq.input[0])
    if weights is None:
        return "its weights are not constant integers"
    if weights.data_type != TensorProto.INT8:
        return f"its weights need {TensorProto.DataType.Name(weights.data_type).lower()} (QLinearConv takes int8)"
    if graph.constant(weight_dq.input[1]) is None or (len(weight_dq.input) > 2 and weight_dq.input[2]):
        return "its weight scale is not a constant with zero point 0"
    return None


def _plan(graph: GraphIndex, conv) -> _Plan:
    input_dq = graph.producers[conv.input[0]]
    weight_dq = graph.producers[conv.input[1]]
    name = _layer_name(conv, weight_dq)
    value, bias_add, relu, quantize = conv.output[0], None, None, None
    nxt = graph.only_consumer(value)
    if nxt is not None and nxt.op_type == "Add" and graph.constant(nxt.input[1]) is not None:
        bias_add, value = nxt, nxt.output[0]
        nxt = graph.only_consumer(value)
    if nxt is not None and nxt.op_type == "Relu":
        relu = nxt
        nxt = graph.only_consumer(nxt.output[0])
    storage = _zero_point_type(graph, input_dq)  # QLinearConv writes the type it reads
    if (nxt is not None and nxt.op_type == "QuantizeLinear" and graph.constant(nxt.input[1]) is not None
            and graph.constant(nxt.input[1]).ndim == 0 and _zero_point_type(graph, nxt) == storage
            and (relu is None or _zero_point(graph, nxt) == np.iinfo(_EIGHT_BIT[storage]).min)):
        quantize = nxt  # at the type's lowest zero point, saturation clips negatives to 0: the ReLU, exactly
    if relu is not None:
        value = relu.output[0]
    return _Plan(conv, name, input_dq, weight_dq, bias_add, relu, quantize, value, storage)


_SHAPE_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def _reaches_graph_output(graph: GraphIndex, value: str) -> bool:
    """Whether `value` is one of the graph's outputs, as it is or only reshaped."""
    if value in graph.graph_outputs:
        return True
    return any(reader.op_type in _SHAPE_OPS and _reaches_graph_output(graph, reader.output[0])
               for reader in graph.consumers.get(value, []))


def _shift(graph: GraphIndex, plan: _Plan, channels: int) -> np.ndarray:
    """The Conv's bias plus the folded BatchNorm shift, per output channel."""
    shift = np.zeros(channels, dtype=np.float64)
    if len(plan.conv.input) > 2 and plan.conv.input[2]:
        shift += graph.constant(plan.conv.input[2]).astype(np.float64).reshape(channels)
    if plan.bias_add is not None:
        shift += graph.constant(plan.bias_add.input[1]).astype(np.float64).reshape(channels)
    return shift


def _spread(integers: np.ndarray, per_channel: bool) -> np.ndarray:
    """The power of two (per output channel, or one for the layer) that spreads the weight integers over int8.

    The BatchNorm shift becomes an int32 bias in accumulator steps (input scale x weight scale), rounded: half a
    step off at worst. With b-bit weights that step is coarse (a 2-bit layer's output spans a few dozen of them,
    so the rounding moved outputs across level boundaries and changed a quarter of the predictions); the
    integers times 2^k, their scale over 2^k (exact in float), make the products, and so the output levels, the
    same and the step 2^k times finer."""
    flat = np.abs(integers.reshape(integers.shape[0], -1).astype(np.int64))
    negative = np.maximum(-integers.reshape(integers.shape[0], -1).min(axis=1), 0)
    positive = np.maximum(integers.reshape(integers.shape[0], -1).max(axis=1), 0)
    if not per_channel:
        negative, positive = np.full_like(negative, negative.max()), np.full_like(positive, positive.max())
    spread = np.ones(len(flat), dtype=np.int64)
    while True:
        wider = spread * 2
        fits = (wider * negative <= 128) & (wider * positive <= 127)
        if not fits.any():
            return spread.astype(np.float64)
        spread = np.where(fits, wider, spread)


def _grid_bounds(graph: GraphIndex, plan: _Plan) -> tuple[int, int]:
    """The levels the requantized output may take, counted from its zero point: the Clip after the
    QuantizeLinear, else its type's range (from 0 where a ReLU is taken in)."""
    clip = graph.only_consumer(plan.quantize.output[0])
    info = np.iinfo(_EIGHT_BIT[plan.storage])
    low, high = int(info.min), int(info.max)
    if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3:
        bounds = graph.constant(clip.input[1]), graph.constant(clip.input[2])
        if bounds[0] is not None and bounds[1] is not None:
            low, high = int(bounds[0]), int(bounds[1])
    zero = _zero_point(graph, plan.quantize)
    low, high = low - zero, high - zero
    return (max(low, 0) if plan.relu is not None else low), high


def _exact_requantization(graph: GraphIndex, plan: _Plan, input_scale: float, weight_scale: np.ndarray,
                          shift: np.ndarray, spread: np.ndarray, output_scale: float):
    """Per channel, the int32 bias and weight scale that give the next quantizer's levels exactly (`exact_bias`);
    a channel without one keeps the rounded shift. Returns (bias, weight scale, exact channels)."""
    low, high = _grid_bounds(graph, plan)
    x_scale, y_scale = np.float32(input_scale), np.float32(output_scale)
    bias, scales, exact = np.round(shift), weight_scale.astype(np.float64).copy(), 0

    def float32_multiplier(multiplier: float):  # as ONNX Runtime forms it: x_scale * w_scale / y_scale
        return x_scale * np.float32(multiplier * output_scale / input_scale) / y_scale

    for channel in range(len(shift)):
        multiplier = input_scale * weight_scale[channel] / output_scale
        found = exact_bias(multiplier, shift[channel], low, high, int(spread[channel]), float32_multiplier)
        if found is not None:
            bias[channel], scales[channel] = found[0], found[1] * output_scale / input_scale
            exact += 1
    return bias, scales, exact


def _qlinear_conv(graph: GraphIndex, plan: _Plan, output_scale: str, output_zero_point: str, output: str):
    """The QLinearConv node for `plan` writing `output` and a note on its integers; or None and why not."""
    input_scale = float(graph.constant(plan.input_dq.input[1]))
    weight_scale = graph.constant(plan.weight_dq.input[1]).astype(np.float64)
    integers = graph.constant(plan.weight_dq.input[0])
    channels = integers.shape[0]
    spread = _spread(integers, per_channel=weight_scale.ndim > 0)
    integers = integers * spread.reshape(-1, *[1] * (integers.ndim - 1))
    weight_scale = np.broadcast_to(weight_scale, (channels,)) / spread
    accumulator_step = input_scale * weight_scale
    if not np.all(accumulator_step != 0):
        return None, "a channel's folded weight scale is 0"
    shift = _shift(graph, plan, channels) / accumulator_step
    if plan.quantize is not None:
        bias, weight_scale, exact = _exact_requantization(graph, plan, input_scale, weight_scale, shift, spread * 1,
                                                          float(graph.constant(output_scale)))
    else:
        bias, exact = np.round(shift), 0
    if not np.isfinite(bias).all() or bias.min() < _INT32.min or bias.max() > _INT32.max:
        return None, "its BatchNorm shift is beyond int32 accumulator steps"
    bias = bias.astype(np.int32)
    weight_zero_point = graph.add_initializer(f"{plan.name}.weight_zero_point",
                                              np.zeros(np.shape(weight_scale), dtype=np.int8))
    bias_name = graph.add_initializer(f"{plan.name}.bias_int32", bias)
    weights = graph.add_initializer(f"{plan.name}.weight_int8", integers.astype(np.int8))
    weight_scale_name = graph.add_initializer(f"{plan.name}.weight_scale_int8", weight_scale.astype(np.float32))
    inputs = [plan.input_dq.input[0], plan.input_dq.input[1], plan.input_dq.input[2], weights, weight_scale_name,
              weight_zero_point, output_scale, output_zero_point, bias_name]
    attributes = {a.name: helper.get_attribute_value(a) for a in plan.conv.attribute}
    node = helper.make_node("QLinearConv", inputs, [output], name=f"{plan.name}.qlinearconv", **attributes)
    spreads = sorted({int(k) for k in spread})
    note = f"weights x {'/'.join(map(str, spreads))} in int8" if spreads != [1] else "weights as trained"
    if plan.quantize is not None:
        note += f"; level boundaries exact in {exact}/{channels} channels" + (
            ", the others' shift rounded" if exact < channels else "")
    return node, note


def _rewrite(model: ModelProto, calibration: torch.Tensor, new_points: bool) -> list[LayerRoute]:
    graph = GraphIndex(model)
    routes: dict[str, LayerRoute] = {}
    plans = []
    for conv in [node for node in model.graph.node if node.op_type == "Conv"]:
        weight_dq = graph.producer(conv.input[1], "DequantizeLinear")
        reason = _why_kept(graph, conv)
        if reason is not None:
            name = _layer_name(conv, weight_dq)
            if weight_dq is not None:  # a quantized layer (a float Conv of the network is not reported)
                routes[name] = LayerRoute(name, KEPT, reason)
            continue
        plan = _plan(graph, conv)
        if plan.quantize is None and not new_points:
            routes[plan.name] = LayerRoute(plan.name, KEPT, "its output enters float arithmetic, and new 8-bit "
                                                            "points were not asked for")
            continue
        if plan.quantize is None and _reaches_graph_output(graph, plan.value):
            routes[plan.name] = LayerRoute(plan.name, KEPT, "its output is the network's (a detector's raw map): "
                                                            "an 8-bit point would round what the model outputs")
            continue
        plans.append(plan)
    for node in model.graph.node:
        weight_dq = graph.producer(node.input[1], "DequantizeLinear") if node.op_type in ("Gemm", "MatMul") else None
        if weight_dq is not None:
            name = _layer_name(node, weight_dq)
            routes[name] = LayerRoute(name, KEPT, f"Linear: {node.op_type} in float on its QDQ levels, exact; a "
                                                  "QLinearMatMul would round its output to 8 bits")
    ranges = calibrate(model, [p.value for p in plans if p.quantize is None], calibration)
    removed, added = set(), []
    for plan in plans:
        if plan.quantize is not None:
            output, scale, zero_point = plan.quantize.output[0], plan.quantize.input[1], plan.quantize.input[2]
            grid = f"writes {_quantizer_name(plan.quantize)}'s input integers, scale {graph.constant(scale):.4g}"
        else:
            dtype = _EIGHT_BIT[plan.storage]
            low, high = ranges[plan.value]
            low = 0.0 if plan.relu is not None else low
            step, offset = new_point_grid(low, high, dtype)
            scale = graph.add_initializer(f"{plan.name}.output_scale", np.array(step, dtype=np.float32))
            zero_point = graph.add_initializer(f"{plan.name}.output_zero_point", np.array(offset, dtype=dtype))
            output = f"{plan.name}.output_integers"
            grid = (f"{np.dtype(dtype).name} zero point {offset}{' (ReLU taken in)' if plan.relu else ''}, scale "
                    f"{step:.4g} = range [{low:.4g}, {high:.4g}] on {len(calibration)} training images / 255")
        node, note = _qlinear_conv(graph, plan, scale, zero_point, output)
        if node is None:
            routes[plan.name] = LayerRoute(plan.name, KEPT, note)
            continue
        grid += f"; {note}"
        added.append(node)
        replaced = [plan.conv, plan.bias_add, plan.relu, plan.quantize]
        removed.update(id(n) for n in replaced if n is not None)
        if plan.quantize is not None:
            routes[plan.name] = LayerRoute(plan.name, REQUANTIZED, grid)
        else:
            added.append(helper.make_node("DequantizeLinear", [output, scale, zero_point], [plan.value],
                                          name=f"{plan.name}.dequantize_output"))
            routes[plan.name] = LayerRoute(plan.name, NEW_POINT, grid)
    replace_nodes(model.graph, [node for node in model.graph.node if id(node) not in removed] + added)
    drop_dead_nodes(model)
    sort_topologically(model)
    return list(routes.values())


def read_image_levels(model: ModelProto, calibration: torch.Tensor) -> LayerRoute | None:
    """Where every calibration image is 8-bit pixels over 255 (a detector's input: uint8 images scaled to
    [0, 1]), let the convolutions reading the image read its uint8 levels k/255 instead of floats: exact on such
    images (QuantizeLinear gives back each k), so the first conv can run as QLinearConv too. A classifier's
    normalised images are not on one such grid and stay float."""
    levels = calibration.double().numpy() * 255
    if not len(levels) or levels.min() < 0 or levels.max() > 255 or np.abs(levels - np.round(levels)).max() > 1e-3:
        return None
    graph = GraphIndex(model)
    readers = graph.consumers.get(INPUT_NAME, [])
    if not readers or any(reader.op_type != "Conv" for reader in readers):
        return None
    scale = graph.add_initializer(f"{INPUT_NAME}.scale", np.array(1 / 255, dtype=np.float32))
    zero_point = graph.add_initializer(f"{INPUT_NAME}.zero_point", np.array(0, dtype=np.uint8))
    nodes = [helper.make_node("QuantizeLinear", [INPUT_NAME, scale, zero_point], [f"{INPUT_NAME}.levels"],
                              name=f"{INPUT_NAME}.quantize"),
             helper.make_node("DequantizeLinear", [f"{INPUT_NAME}.levels", scale, zero_point],
                              [f"{INPUT_NAME}.on_levels"], name=f"{INPUT_NAME}.dequantize")]
    for reader in readers:
        reader.input[0] = f"{INPUT_NAME}.on_levels"
    replace_nodes(model.graph, nodes + list(model.graph.node))
    return LayerRoute(INPUT_NAME, IMAGE_LEVELS, f"uint8 levels k/255: all {len(calibration)} calibration images lie "
                                                 "on them, so the convs reading the image read integers, exactly")


def bias_into_float_convs(model: ModelProto) -> int:
    """Give each float Conv left in the graph (the layers kept as QDQ) its folded BatchNorm shift back as the Conv's
    own bias, in place of the separate Add that folding wrote for the integer rewrite to read. ONNX Runtime then
    fuses Conv, bias and ReLU into one kernel (its Conv + Add fusion does not fire on a Conv whose weights are a
    DequantizeLinear). The Conv adds its bias to the accumulated sum as the Add did: bitwise the same outputs.
    Only a Conv on a float input (the image conv): on a dequantized input ONNX Runtime may fuse the Conv into an
    integer kernel and round its bias to int32 (see `--fold_bn` in the README). Returns how many were merged."""
    graph = GraphIndex(model)
    merged = 0
    for conv in [node for node in model.graph.node if node.op_type == "Conv" and len(node.input) == 2
                 and graph.producer(node.input[0], "DequantizeLinear") is None]:
        add = graph.only_consumer(conv.output[0])
        shift = graph.constant(add.input[1]) if add is not None and add.op_type == "Add" else None
        if shift is None or shift.ndim != 4 or shift.shape[:1] + shift.shape[2:] != (1, 1, 1):
            continue
        conv.input.append(graph.add_initializer(f"{add.input[1]}.as_conv_bias", shift.reshape(-1)))
        conv.output[0] = add.output[0]
        model.graph.node.remove(add)
        merged += 1
    if merged:
        drop_dead_nodes(model)
    return merged


def export_onnx_int8(net: nn.Module, example: torch.Tensor, calibration: torch.Tensor, path: str | Path,
                     new_points: bool = True, check: Callable[[Path], None] | None = None) -> Int8Export:
    """Write `net` (fake-quant) as ONNX whose quantized convolutions are QLinearConv; `example` is one input batch,
    `calibration` the training images that set the scales of the new 8-bit points. `check` runs on the written
    file before it takes its name (see `deploy.output.write_file`)."""
    model, report = qdq_model(net, example, fold_bn=True)
    store_grids_as_uint8(model)
    del model.graph.value_info[:]  # the exporter's recorded types and shapes: retyped and rewritten tensors below
    image = read_image_levels(model, calibration) if new_points else None
    routes = ([image] if image else []) + _rewrite(model, calibration, new_points)
    if new_points:
        routes += [LayerRoute(op, INTEGER_OP, detail) for op, detail in integer_activations(model, calibration)]
    if not any(route.route != KEPT for route in routes):
        raise ExportError("no quantized layer has both its input and its weights on 8-bit integer grids, so "
                          "--format onnx-int8 has nothing to run in integer kernels (weights-only methods such as "
                          "dorefa quantize no activations); use --format onnx")
    bias_into_float_convs(model)
    channels_last_ops = lay_out_channels_last(model)
    size = write_model(model, Path(path), check)
    return Int8Export(**{**vars(report), "path": Path(path), "size": size}, routes=routes,
                      channels_last_ops=channels_last_ops)
