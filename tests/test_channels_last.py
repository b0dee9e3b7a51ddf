"""deploy.channels_last on a hand-built integer graph holding every op it moves: a QLinearConv, an integer max
pool, a nearest upsampling, QLinearConcat, QLinearSigmoid, QLinearMul and QLinearAdd. Written channels-last,
the graph computes bitwise what it did, with one Transpose where the integers enter and one where they leave."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_helpers import image_graph

from deploy.channels_last import lay_out_channels_last
from deploy.onnx_graph import MICROSOFT
from deploy.onnx_qdq import INPUT_NAME
from deploy.verify import session

pytestmark = pytest.mark.unit


def _integer_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    constants = {
        "s": np.array(0.02, np.float32), "z": np.array(0, np.uint8), "z128": np.array(128, np.uint8),
        "w": rng.integers(-127, 128, (6, 3, 3, 3)).astype(np.int8), "w_s": np.full(6, 0.01, np.float32),
        "w_z": np.zeros(6, np.int8), "b": rng.integers(-500, 500, 6).astype(np.int32),
        "y_s": np.array(0.05, np.float32), "scales": np.array([1, 1, 2, 2], np.float32),
        "sig_s": np.array(1 / 255, np.float32),
    }
    microsoft = {"domain": MICROSOFT}
    nodes = [
        helper.make_node("QuantizeLinear", [INPUT_NAME, "s", "z"], ["x"]),
        helper.make_node("QLinearConv", ["x", "s", "z", "w", "w_s", "w_z", "y_s", "z", "b"], ["c"],
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("QLinearConcat", ["y_s", "z", "c", "y_s", "z", "u", "y_s", "z"], ["cat"], axis=1,
                         **microsoft),
        helper.make_node("QLinearSigmoid", ["cat", "y_s", "z", "sig_s", "z"], ["g"], **microsoft),
        helper.make_node("QLinearMul", ["cat", "y_s", "z", "g", "sig_s", "z", "y_s", "z128"], ["silu"], **microsoft),
        helper.make_node("QLinearAdd", ["silu", "y_s", "z128", "cat", "y_s", "z", "y_s", "z128"], ["sum"],
                         **microsoft),
        helper.make_node("DequantizeLinear", ["sum", "y_s", "z128"], ["out"]),
    ]
    return image_graph("integers", nodes, [None, 3, 8, 8], {"out": TensorProto.FLOAT, "cat": TensorProto.UINT8},
                       constants)


def test_the_integer_section_runs_channels_last_with_the_same_values():
    nchw = _integer_graph()
    nhwc = _integer_graph()
    assert lay_out_channels_last(nhwc) == 7
    ops = {(node.op_type, node.domain) for node in nhwc.graph.node}
    assert ("QLinearConv", MICROSOFT) in ops and ("NhwcMaxPool", MICROSOFT) in ops
    assert [a.i for node in nhwc.graph.node if node.op_type == "QLinearConcat" for a in node.attribute] == [3]
    assert [node.op_type for node in nhwc.graph.node].count("Transpose") == 3  # in; out to float; "cat" output
    images = np.random.default_rng(1).uniform(0, 5, (2, 3, 8, 8)).astype(np.float32)
    expected = session(nchw.SerializeToString()).run(None, {INPUT_NAME: images})
    got = session(nhwc.SerializeToString()).run(None, {INPUT_NAME: images})
    assert expected[0].shape == (2, 12, 8, 8) and len(np.unique(expected[0])) > 20
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)


def test_a_graph_without_integer_convolutions_is_left_alone():
    model = _integer_graph()
    kept = [node for node in model.graph.node if node.op_type != "QLinearConv"]
    kept[0].output[0] = "c"  # the max pool reads the quantized image directly
    del model.graph.node[:]
    model.graph.node.extend(kept)
    before = model.SerializeToString()
    assert lay_out_channels_last(model) == 0 and model.SerializeToString() == before
