"""Fake-quantization for QAT studies: LSQ, PACT, DoReFa, the method registry and the spec that pick them, and
the module swap. Code outside this package reads a quantizer only through `Quantizer`'s members (base.py).

Nothing here imports Lightning: the quantizers work in any PyTorch training loop.
"""

from quantizers.base import (
    DataInitializedQuantizer,
    LearnedParameter,
    Quantizer,
    quantizers_in,
    unready_quantizers,
)
from quantizers.compiling import prepare
from quantizers.dorefa import DoReFaActQuantizer, DoReFaWeightQuantizer
from quantizers.errors import QuantSpecError
from quantizers.grid import IntegerGrid, NoIntegerGrid
from quantizers.layers import QuantConv2d, QuantLinear
from quantizers.lsq import LSQQuantizer
from quantizers.methods import (
    FLOAT_BITS,
    REGISTRY,
    Method,
    method_colour,
    method_label,
    precision_label,
    register,
    weight_noise_statistics,
)
from quantizers.noise import GaussianWeightNoise
from quantizers.pact import PACTQuantizer
from quantizers.spec import CHECKPOINT_KEY, METHODS, QuantSpec
from quantizers.swap import (
    applied_spec,
    parameter_groups,
    plan_layers,
    quantize_model,
    quantized_layers,
    quantizer_state,
    weight_quantization_noise,
)

__all__ = [
    "CHECKPOINT_KEY",
    "FLOAT_BITS",
    "METHODS",
    "REGISTRY",
    "DataInitializedQuantizer",
    "DoReFaActQuantizer",
    "DoReFaWeightQuantizer",
    "GaussianWeightNoise",
    "IntegerGrid",
    "LSQQuantizer",
    "LearnedParameter",
    "Method",
    "NoIntegerGrid",
    "PACTQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "QuantSpecError",
    "Quantizer",
    "applied_spec",
    "method_colour",
    "method_label",
    "parameter_groups",
    "prepare",
    "plan_layers",
    "precision_label",
    "quantize_model",
    "quantized_layers",
    "quantizer_state",
    "quantizers_in",
    "register",
    "unready_quantizers",
    "weight_noise_statistics",
    "weight_quantization_noise",
]
