"""deploy.integer_activations on hand-built graphs: a float residual addition becomes QLinearAdd, whose integers
are the quantizer's rounding of the sum of its two 8-bit operands, and whose float readers get a calibrated
8-bit point; a SiLU becomes QLinearSigmoid and QLinearMul; a max pool keeps its input's grid. And
deploy.onnx_int8.read_image_levels: 8-bit images read as integers, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import image_graph

from deploy.integer_activations import integer_activations
from deploy.onnx_qdq import INPUT_NAME
from deploy.verify import session

pytestmark = pytest.mark.unit

SHAPE = [None, 4, 8, 8]
A_SCALE, A_ZERO, SUM_SCALE = 0.03, 131, 0.05  # the integer operand's grid (asymmetric), the quantizer's step


def _residual_graph(integer_operand: bool = True) -> onnx.ModelProto:
    """images -> (8-bit a) + relu(-0.7 images) -> Relu -> [QuantizeLinear -> "sum_integers"] and
    [ReduceMean -> "pooled"]: one quantizer and one float reader of the sum."""
    constants = {"a_scale": np.array(A_SCALE, np.float32), "a_zero": np.array(A_ZERO, np.uint8),
                 "next.input_scale": np.array(SUM_SCALE, np.float32), "sum_zero": np.array(0, np.uint8),
                 "minus": np.array(-0.7, np.float32), "axes": np.array([2, 3], np.int64)}
    nodes = [helper.make_node("Mul", [INPUT_NAME, "minus"], ["scaled"]),
             helper.make_node("Relu", ["scaled"], ["b"])]
    if integer_operand:
        nodes += [helper.make_node("QuantizeLinear", [INPUT_NAME, "a_scale", "a_zero"], ["a_integers"]),
                  helper.make_node("DequantizeLinear", ["a_integers", "a_scale", "a_zero"], ["a"])]
    else:
        nodes += [helper.make_node("Relu", [INPUT_NAME], ["a"])]
    nodes += [helper.make_node("Add", ["a", "b"], ["sum"], name="sum"),
              helper.make_node("Relu", ["sum"], ["sum_relu"]),
              helper.make_node("QuantizeLinear", ["sum_relu", "next.input_scale", "sum_zero"], ["sum_integers"]),
              helper.make_node("ReduceMean", ["sum_relu", "axes"], ["pooled"])]
    outputs = {"sum_integers": TensorProto.UINT8, "pooled": TensorProto.FLOAT}
    return image_graph("residual", nodes, SHAPE, outputs, constants)


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, 4, 8, 8)).astype(np.float32))


def _run(model: onnx.ModelProto, images: torch.Tensor) -> list[np.ndarray]:
    return session(model.SerializeToString()).run(["sum_integers", "pooled"], {INPUT_NAME: images.numpy()})


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_the_addition_runs_in_integers_and_rounds_as_the_quantizer_does():
    model = _residual_graph()
    described = integer_activations(model, _images(64, seed=1))
    ops = [node.op_type for node in model.graph.node]
    assert "Add" not in ops and ops.count("QLinearAdd") == 2  # the quantizer's, and the float reader's new point
    assert [op for op, _ in described] == ["sum operand", "sum Add"]  # b quantized first, then the addition
    assert "QLinearAdd, ReLU by saturation; writes next's input integers; a new uint8 point" in described[1][1]

    images = _images(256, seed=2)
    integers, pooled = _run(model, images)
    # The formula, on the operands the integer graph has: a on its grid, b on the calibrated point the rewrite
    # gave it (the float operand came from outside the integer graph).
    x = images.numpy().astype(np.float64)
    a = (np.clip(np.round(x / A_SCALE) + A_ZERO, 0, 255) - A_ZERO) * A_SCALE
    b_scale, b_zero = (float(_constant(model, f"sum.operand.{field}")) for field in ("scale", "zero_point"))
    b = (np.clip(np.round(np.maximum(-0.7 * x, 0) / b_scale) + b_zero, 0, 255) - b_zero) * b_scale
    expected = np.clip(np.round(np.maximum(a + b, 0) / SUM_SCALE), 0, 255)
    differing = integers.astype(np.int64) != expected
    assert np.abs(integers.astype(np.int64) - expected).max() <= 1  # float rounding at a level boundary only
    assert differing.mean() < 1e-3, f"{differing.sum()} of {differing.size} integers differ from the formula"
    # The float reader gets the sum through its new 8-bit point: within half a step of the exact graph's.
    _, exact_pooled = _run(_residual_graph(), images)
    carrier_step = float(_constant(model, "sum.add_output.scale"))
    assert np.abs(pooled - exact_pooled).max() <= carrier_step  # a mean of values each within a step


def test_a_sum_of_two_float_tensors_is_left_in_float():
    model = _residual_graph(integer_operand=False)
    before = model.SerializeToString()
    assert integer_activations(model, _images(16, seed=0)) == []
    assert model.SerializeToString() == before


X_SCALE, NEXT_SCALE = 0.05, 0.04  # a signed grid stored as uint8 at zero point 128 (as the int8 export stores it)


def _silu_graph() -> onnx.ModelProto:
    """images -> 8-bit x -> SiLU (Sigmoid, Mul) -> the next quantizer ("silu_integers"), and x -> MaxPool
    ("pooled", a float reader)."""
    constants = {"x_scale": np.array(X_SCALE, np.float32), "x_zero": np.array(128, np.uint8),
                 "next.input_scale": np.array(NEXT_SCALE, np.float32), "next_zero": np.array(128, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", [INPUT_NAME, "x_scale", "x_zero"], ["x_integers"]),
             helper.make_node("DequantizeLinear", ["x_integers", "x_scale", "x_zero"], ["x"]),
             helper.make_node("Sigmoid", ["x"], ["gate"], name="silu_sigmoid"),
             helper.make_node("Mul", ["x", "gate"], ["silu"], name="silu_mul"),
             helper.make_node("QuantizeLinear", ["silu", "next.input_scale", "next_zero"], ["silu_integers"]),
             helper.make_node("MaxPool", ["x"], ["pooled"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[1, 1])]
    outputs = {"silu_integers": TensorProto.UINT8, "pooled": TensorProto.FLOAT}
    return image_graph("silu", nodes, SHAPE, outputs, constants)


def test_a_silu_runs_as_qlinear_sigmoid_and_mul_and_a_max_pool_keeps_its_grid():
    model = _silu_graph()
    described = dict(integer_activations(model, _images(16, seed=3)))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QLinearSigmoid") == ops.count("QLinearMul") == 1 and not {"Sigmoid", "Mul"} & set(ops)
    assert "range [0, 1] (a sigmoid's)" in described["silu_sigmoid Sigmoid"]
    assert described["silu_mul Mul"] == "QLinearMul; writes next's input integers"
    assert "its input's grid" in described["pool MaxPool"]
    pool = next(node for node in model.graph.node if node.op_type == "MaxPool")
    assert pool.input[0] == "x_integers"  # the max is taken of the integers themselves

    images = _images(256, seed=4)
    integers, pooled = session(model.SerializeToString()).run(["silu_integers", "pooled"],
                                                              {INPUT_NAME: images.numpy()})
    x = (np.clip(np.round(images.numpy().astype(np.float64) / X_SCALE) + 128, 0, 255) - 128) * X_SCALE
    gate = np.clip(np.round(1 / (1 + np.exp(-x)) * 255), 0, 255) / 255  # the sigmoid on its [0, 1] point
    expected = np.clip(np.round(x * gate / NEXT_SCALE) + 128, 0, 255)
    off = np.abs(integers.astype(np.int64) - expected)
    # ONNX Runtime evaluates the sigmoid with its own approximation of the logistic function: 2 % of the gate's
    # integers land one level off the formula's (measured), and 0.45 % of the SiLU's after the product.
    assert off.max() <= 1 and (off > 0).mean() < 0.01, f"{(off > 0).sum()} of {off.size} integers off the formula"
    exact_pooled = session(_silu_graph().SerializeToString()).run(["pooled"], {INPUT_NAME: images.numpy()})[0]
    np.testing.assert_array_equal(pooled, exact_pooled)  # a max of grid values is a grid value: no rounding


def _image_conv_graph() -> onnx.ModelProto:
    weights = np.random.default_rng(0).integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    constants = {"w": weights, "w_scale": np.array(0.01, np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["weight"]),
             helper.make_node("Conv", [INPUT_NAME, "weight"], ["features"], pads=[1, 1, 1, 1])]
    return image_graph("image", nodes, [None, 3, 8, 8], {"features": TensorProto.FLOAT}, constants)


def test_eight_bit_images_are_read_as_their_levels_and_normalised_ones_are_not():
    from deploy.onnx_int8 import IMAGE_LEVELS, read_image_levels

    pixels = torch.randint(0, 256, (16, 3, 8, 8)) / 255  # a detector's input
    model = _image_conv_graph()
    route = read_image_levels(model, pixels)
    assert route is not None and route.route == IMAGE_LEVELS and "all 16 calibration images" in route.detail
    assert [node.op_type for node in model.graph.node][:2] == ["QuantizeLinear", "DequantizeLinear"]
    model.graph.output.append(helper.make_tensor_value_info(f"{INPUT_NAME}.levels", TensorProto.UINT8, None))
    levels, through_levels = session(model.SerializeToString()).run([f"{INPUT_NAME}.levels", "features"],
                                                                   {INPUT_NAME: pixels.numpy()})
    np.testing.assert_array_equal(levels, (pixels * 255).round().numpy())  # every pixel's own level
    exact = session(_image_conv_graph().SerializeToString()).run(["features"], {INPUT_NAME: pixels.numpy()})[0]
    np.testing.assert_allclose(through_levels, exact, rtol=1e-5, atol=1e-6)  # k * (1/255) vs k / 255: an ulp

    normalised = (pixels - 0.5) / 0.25  # a classifier's input: not on one 8-bit grid
    untouched = _image_conv_graph()
    assert read_image_levels(untouched, normalised) is None
    assert untouched.SerializeToString() == _image_conv_graph().SerializeToString()
