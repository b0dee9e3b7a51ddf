"""Hand-built ONNX graphs for the export rewrites' unit tests: one float image input, named outputs, constants."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploy.onnx_graph import MICROSOFT
from deploy.onnx_qdq import INPUT_NAME


def image_graph(name: str, nodes: list, input_shape: list, outputs: dict[str, int],
                constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model reading float images of `input_shape` as INPUT_NAME and returning `outputs` ({name: element
    type}), opset 21 and ONNX Runtime's contrib domain (ir_version 10: what ONNX Runtime 1.31 reads)."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, element, None) for output, element in outputs.items()],
        [numpy_helper.from_array(value, constant) for constant, value in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MICROSOFT, 1)],
                             ir_version=10)
