"""deploy.integer_residual on hand-built graphs: a float residual addition becomes QLinearAdd, whose integers are
the quantizer's rounding of the sum of its two 8-bit operands, and whose float readers get a calibrated 8-bit
point."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploy.integer_residual import integer_residuals
from deploy.onnx_qdq import INPUT_NAME
from deploy.verify import session

pytestmark = pytest.mark.unit

SHAPE = [None, 4, 8, 8]
A_SCALE, A_ZERO, SUM_SCALE = 0.03, 131, 0.05  # the integer operand's grid (asymmetric), the quantizer's step


def _residual_graph(integer_operand: bool = True) -> onnx.ModelProto:
    """images -> (8-bit a) + relu(-0.7 images) -> Relu -> [QuantizeLinear -> "sum_integers"] and
    [ReduceMean -> "pooled"]: one quantizer and one float reader of the sum."""
    constants = {"a_scale": np.array(A_SCALE, np.float32), "a_zero": np.array(A_ZERO, np.uint8),
                 "sum_scale": np.array(SUM_SCALE, np.float32), "sum_zero": np.array(0, np.uint8),
                 "minus": np.array(-0.7, np.float32), "axes": np.array([2, 3], np.int64)}
    nodes = [helper.make_node("Mul", [INPUT_NAME, "minus"], ["scaled"]),
             helper.make_node("Relu", ["scaled"], ["b"])]
    if integer_operand:
        nodes += [helper.make_node("QuantizeLinear", [INPUT_NAME, "a_scale", "a_zero"], ["a_integers"]),
                  helper.make_node("DequantizeLinear", ["a_integers", "a_scale", "a_zero"], ["a"])]
    else:
        nodes += [helper.make_node("Relu", [INPUT_NAME], ["a"])]
    nodes += [helper.make_node("Add", ["a", "b"], ["sum"]),
              helper.make_node("Relu", ["sum"], ["sum_relu"]),
              helper.make_node("QuantizeLinear", ["sum_relu", "sum_scale", "sum_zero"], ["sum_integers"]),
              helper.make_node("ReduceMean", ["sum_relu", "axes"], ["pooled"])]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("sum_integers", TensorProto.UINT8, None),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, 4, 8, 8)).astype(np.float32))


def _run(model: onnx.ModelProto, images: torch.Tensor) -> list[np.ndarray]:
    return session(model.SerializeToString()).run(["sum_integers", "pooled"], {INPUT_NAME: images.numpy()})


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_the_addition_runs_in_integers_and_rounds_as_the_quantizer_does():
    model = _residual_graph()
    described = integer_residuals(model, _images(64, seed=1))
    ops = [node.op_type for node in model.graph.node]
    assert "Add" not in ops and ops.count("QLinearAdd") == 2  # the quantizer's, and the float reader's new point
    assert len(described) == 1 and "QLinearAdd, ReLU by saturation" in described[0][1]
    assert "a new uint8 point for its float readers" in described[0][1]

    images = _images(256, seed=2)
    integers, pooled = _run(model, images)
    # The formula, on the operands the integer graph has: a on its grid, b on the calibrated point the rewrite
    # gave it (the float operand came from outside the integer graph).
    x = images.numpy().astype(np.float64)
    a = (np.clip(np.round(x / A_SCALE) + A_ZERO, 0, 255) - A_ZERO) * A_SCALE
    b_scale, b_zero = (float(_constant(model, f"{described[0][0]}.shortcut_input.{field}"))
                       for field in ("scale", "zero_point"))
    b = (np.clip(np.round(np.maximum(-0.7 * x, 0) / b_scale) + b_zero, 0, 255) - b_zero) * b_scale
    expected = np.clip(np.round(np.maximum(a + b, 0) / SUM_SCALE), 0, 255)
    differing = integers.astype(np.int64) != expected
    assert np.abs(integers.astype(np.int64) - expected).max() <= 1  # float rounding at a level boundary only
    assert differing.mean() < 1e-3, f"{differing.sum()} of {differing.size} integers differ from the formula"
    # The float reader gets the sum through its new 8-bit point: within half a step of the exact graph's.
    _, exact_pooled = _run(_residual_graph(), images)
    carrier_step = float(_constant(model, f"{described[0][0]}.output.scale"))
    assert np.abs(pooled - exact_pooled).max() <= carrier_step  # a mean of values each within a step


def test_a_sum_of_two_float_tensors_is_left_in_float():
    model = _residual_graph(integer_operand=False)
    before = model.SerializeToString()
    assert integer_residuals(model, _images(16, seed=0)) == []
    assert model.SerializeToString() == before
