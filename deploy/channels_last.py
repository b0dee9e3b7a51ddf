"""The integer section of an `onnx-int8` graph laid out channels-last (NHWC) in the file itself.

ONNX Runtime runs its integer convolutions channels-last. Given an NCHW graph, its layout transformer converts
each QLinearConv and puts Transposes around it, then pushes and cancels Transposes op by op. That is greedy: in
ResNet20's first stage, where the first residual addition reads the quantized float stem (NCHW), it kept the
stage's integer additions in NCHW and transposed every conv output out of NHWC and back: 8 Transposes, 3-9 ms
of a 20-30 ms batch of 128.

Here the file states the layout, so there is nothing left for the transformer to decide:

- QLinearConv becomes ONNX Runtime's channels-last QLinearConv (`com.microsoft`, `channels_last=1`; the weights
  stay OIHW, as its own transformer leaves them);
- the integer ops that do not care about layout (QLinearAdd, QLinearMul, QLinearSigmoid) run on NHWC operands,
  QLinearConcat joins along the NHWC channel axis, an integer max pool becomes `NhwcMaxPool` and a nearest
  Resize scales the NHWC axes;
- one Transpose is written where an 8-bit tensor enters the section (a QuantizeLinear of a float value) and
  one where a tensor leaves it (for a float reader, or as a graph output).

Moving data is all a Transpose does, so the values are bitwise those of the NCHW graph.
"""

from __future__ import annotations

from onnx import ModelProto, helper

from deploy.onnx_graph import MICROSOFT, GraphIndex, import_microsoft_ops, replace_nodes

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
_ELEMENTWISE = {"QLinearAdd": (0, 3), "QLinearMul": (0, 3), "QLinearSigmoid": (0,)}  # their data inputs
_NCHW_TO_NHWC_AXIS = {1: 3, -3: 3}
# Ops whose output has their first input's rank: what they make of an (N, C, H, W) tensor is one too.
_RANK_KEEPING = {"Conv", "QLinearConv", "MaxPool", "Resize", "Concat", "QLinearConcat", "Add", "Mul", "Sigmoid",
                 "Relu", "Clip", "QuantizeLinear", "DequantizeLinear", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
                 "BatchNormalization"}


def _attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layout_free_inputs(graph: GraphIndex, node, integers: set[str]) -> tuple[int, ...] | None:
    """Positions of `node`'s activation inputs when it can run channels-last, else None. `integers`: the 8-bit
    tensors so far (a MaxPool or Resize counts only on integers; on floats it is not part of the section)."""
    if node.op_type == "QLinearConv" and node.domain in ("", "ai.onnx"):
        return (0,)
    if node.domain == MICROSOFT and node.op_type in _ELEMENTWISE:
        return _ELEMENTWISE[node.op_type]
    if node.domain == MICROSOFT and node.op_type == "QLinearConcat":
        return tuple(range(2, len(node.input), 3)) if _attributes(node).get("axis") in _NCHW_TO_NHWC_AXIS else None
    if node.op_type == "MaxPool" and node.input[0] in integers and len(node.output) == 1:
        return (0,)
    if node.op_type == "Resize" and node.input[0] in integers:
        nearest = _attributes(node).get("mode", b"nearest") == b"nearest"
        scales = graph.constant(node.input[2]) if len(node.input) == 3 and node.input[2] else None
        return (0,) if nearest and scales is not None and scales.shape == (4,) else None
    return None


def _channels_last(graph: GraphIndex, node, inputs: list[str]):
    """`node` rewritten for NHWC operands `inputs`."""
    attributes = _attributes(node)
    if node.op_type == "QLinearConv":
        if attributes.get("auto_pad", b"NOTSET") == b"NOTSET":
            attributes.pop("auto_pad", None)
        return helper.make_node("QLinearConv", inputs, list(node.output), name=node.name, domain=MICROSOFT,
                                channels_last=1, **attributes)
    if node.op_type == "QLinearConcat":
        attributes["axis"] = _NCHW_TO_NHWC_AXIS[attributes["axis"]]
    if node.op_type == "MaxPool":  # storage_order only orders the indices output, which a section pool has not
        kept = {k: v for k, v in attributes.items() if k != "storage_order"}
        return helper.make_node("NhwcMaxPool", inputs, list(node.output), name=node.name, domain=MICROSOFT, **kept)
    if node.op_type == "Resize":
        scales = graph.constant(node.input[2])
        inputs[2] = graph.add_initializer(f"{node.input[2]}.nhwc", scales[TO_NHWC])
    return helper.make_node(node.op_type, inputs, list(node.output), name=node.name, domain=node.domain,
                            **attributes)


def _copy(node, inputs: list[str]):
    copy = type(node)()
    copy.CopyFrom(node)
    copy.input[:] = inputs
    return copy


def lay_out_channels_last(model: ModelProto) -> int:
    """Rewrite the integer section of `model` (nodes in topological order) channels-last; returns how many of
    its ops now run NHWC (0: the graph has no integer convolution, and is left as it was)."""
    graph = GraphIndex(model)
    if not any(node.op_type == "QLinearConv" for node in model.graph.node):
        return 0
    images = {i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) == 4}
    integers = {out for node in model.graph.node if node.op_type == "QuantizeLinear" for out in node.output}
    nhwc: set[str] = set()
    transposed: dict[tuple[str, str], str] = {}
    nodes = []

    def transpose(name: str, perm: list[int], suffix: str) -> str:
        if (name, suffix) not in transposed:
            transposed[name, suffix] = f"{name}.{suffix}"
            nodes.append(helper.make_node("Transpose", [name], [f"{name}.{suffix}"], perm=perm,
                                          name=f"{name} to {suffix}"))
        return transposed[name, suffix]

    moved = 0
    for node in model.graph.node:
        inputs = list(node.input)
        positions = _layout_free_inputs(graph, node, integers)
        if positions is not None and all(inputs[p] in images for p in positions):
            for position in positions:
                if inputs[position] not in nhwc:
                    inputs[position] = transpose(inputs[position], TO_NHWC, "nhwc")
            nodes.append(_channels_last(graph, node, inputs))
            nhwc.update(node.output)
            integers.update(node.output)
            moved += 1
        else:
            nodes.append(_copy(node, [transpose(i, TO_NCHW, "nchw") if i in nhwc else i for i in inputs]))
        first_data = 2 if node.op_type == "QLinearConcat" else 0  # its inputs start with the output's grid
        if node.op_type in _RANK_KEEPING and len(node.input) > first_data and node.input[first_data] in images:
            images.update(node.output)
    for output in model.graph.output:
        if output.name in nhwc:  # a graph output keeps its name and its NCHW layout
            inner = f"{output.name}.nhwc_inside"
            for node in nodes:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            nodes.append(helper.make_node("Transpose", [inner], [output.name], perm=TO_NCHW))
    replace_nodes(model.graph, nodes)
    import_microsoft_ops(model)
    return moved
