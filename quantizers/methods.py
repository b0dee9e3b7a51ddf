"""The method registry: per quantization method, what it quantizes, which quantizer each layer role gets, how
its weight noise is measured, and how reports name and colour it. Adding a method whose quantizers learn
nothing is one `register` call plus its quantizer class; `QuantSpec`, the module swap, the noise statistics,
the study grid and the report all read it from here. A quantizer with a learned parameter also needs its
entry in `LEARNED_PARAMETERS` below (its optimizer group and weight decay), and one with a first-batch
initialisation must tell `compiling.quantizers_ready`; the exporter (`deploy/grids.py`) knows the integer
grids of LSQ, PACT and DoReFa only.

Also here, because every layer above prints or stores it: the precision label ('FP32', 'W4A4', 'W4') and
the convention that 32 bits in a results row means a float (unquantized) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantizers.dorefa import DoReFaWeightQuantizer
from quantizers.errors import QuantSpecError
from quantizers.lsq import LSQQuantizer
from quantizers.noise import GaussianWeightNoise, lsq_quantization_error
from quantizers.pact import PACTQuantizer

if TYPE_CHECKING:
    from quantizers.spec import QuantSpec

FLOAT_BITS = 32  # how a float (unquantized) tensor's precision is written in a results row
FP32 = "fp32"

# (the layer's float weight, its bits, the spec, whether it is the network's last layer) -> weight quantizer
WeightBuilder = Callable[[torch.Tensor, int, "QuantSpec", bool], nn.Module]
# (the layer's input bits, the spec) -> input quantizer
InputBuilder = Callable[[int, "QuantSpec"], nn.Module]
# (weight, its quantizer) -> (delta, squared grid step): the weight quantization noise and the Delta^2 of the
# uniform-noise prediction Delta^2 / 12, in the domain the straight-through estimator treats as the identity.
NoiseModel = Callable[[torch.Tensor, nn.Module], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """One quantization method.

    Args:
        name: its `quantization.method` value and the prefix of a study cell's name.
        label: how reports name it ("LSQ").
        colour: its matplotlib colour in the report's figures.
        weight: builds a layer's weight quantizer (None: weights stay float).
        weight_class: the class `weight` builds, by which a layer's quantizer finds its noise model.
        noise: the weight-noise model of `weight_class`.
        input: builds a layer's input quantizer (None: inputs stay float).
        signed_inputs: whether its input quantizer can be signed (`quantization.act_signed`).
    """

    name: str
    label: str
    colour: str
    weight: WeightBuilder | None = None
    weight_class: type[nn.Module] | None = None
    noise: NoiseModel | None = None
    input: InputBuilder | None = None
    signed_inputs: bool = True

    @property
    def quantized(self) -> bool:
        return self.weight is not None or self.input is not None

    @property
    def quantizes_activations(self) -> bool:
        return self.input is not None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method; returns it."""
    REGISTRY[method.name] = method
    return method


def method(name: str) -> Method:
    """The registered method called `name` (KeyError if none)."""
    return REGISTRY[name]


def method_label(name: str) -> str:
    """'LSQ', 'PACT + DoReFa', ...; an unknown name (e.g. a study from another version) is shown as it is."""
    return REGISTRY[name].label if name in REGISTRY else name


def method_colour(name: str) -> str:
    return REGISTRY[name].colour if name in REGISTRY else "tab:gray"


def precision_label(method_name: str, weight_bits: int | None, act_bits: int | None) -> str:
    """'FP32' for an unquantized run; 'W4A4'; 'W4' when activations stay float (act_bits None or 32)."""
    if method_name == FP32 or weight_bits in (None, FLOAT_BITS):
        return "FP32"
    if act_bits is None or act_bits == FLOAT_BITS:
        return f"W{weight_bits}"
    return f"W{weight_bits}A{act_bits}"


# ---------------------------------------------------------------- the methods of the paper, and the control


def _lsq_weight(weight: torch.Tensor, bits: int, spec: QuantSpec, is_last: bool) -> nn.Module:
    quantizer = LSQQuantizer(bits, signed=True, num_channels=weight.shape[0] if spec.per_channel else None)
    quantizer.to(weight.device)
    quantizer.initialize_from(weight.detach())
    return quantizer


def _lsq_input(bits: int, spec: QuantSpec) -> nn.Module:
    return LSQQuantizer(bits, signed=spec.act_signed, activation=True)


def _lsq_noise(weight: torch.Tensor, quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return quantizer(weight) - weight, quantizer.step.detach().clamp_min(1e-12).pow(2).mean()


def _dorefa_weight(weight: torch.Tensor, bits: int, spec: QuantSpec, is_last: bool) -> nn.Module:
    # DoReFa weights lie in [-1, 1]: the last layer has no BatchNorm after it to absorb that, so it keeps
    # its float scale (see DoReFaWeightQuantizer.rescale).
    return DoReFaWeightQuantizer(bits, per_channel=spec.per_channel, rescale=is_last)


def _dorefa_noise(weight: torch.Tensor, quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # Against the unrounded DoReFa transform tanh(w) / max|tanh(w)|, whose output lives in [-1, 1].
    unrounded, rounded = quantizer.unrounded_and_rounded(weight)
    return rounded - unrounded, torch.tensor((2.0 / (2**quantizer.bits - 1)) ** 2)


def _pact_input(bits: int, spec: QuantSpec) -> nn.Module:
    return PACTQuantizer(bits, alpha=spec.pact_alpha)


def _matched_noise_weight(weight: torch.Tensor, bits: int, spec: QuantSpec, is_last: bool) -> nn.Module:
    return GaussianWeightNoise(bits)


def _matched_noise_noise(weight: torch.Tensor, quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # The noise the control is matched to: b-bit LSQ quantization at its initial step. Its mean square is the
    # variance of the Gaussian the control injects.
    error, step = lsq_quantization_error(weight, quantizer.bits)
    return error, step.pow(2)


register(Method(FP32, "FP32", "black"))
register(Method("lsq", "LSQ", "tab:blue", weight=_lsq_weight, weight_class=LSQQuantizer, noise=_lsq_noise,
                input=_lsq_input))
register(Method("pact_dorefa", "PACT + DoReFa", "tab:orange", weight=_dorefa_weight,
                weight_class=DoReFaWeightQuantizer, noise=_dorefa_noise, input=_pact_input, signed_inputs=False))
register(Method("dorefa", "DoReFa (weights only)", "tab:green", weight=_dorefa_weight,
                weight_class=DoReFaWeightQuantizer, noise=_dorefa_noise))
register(Method("noise", "matched noise", "tab:gray", weight=_matched_noise_weight, weight_class=GaussianWeightNoise,
                noise=_matched_noise_noise))


# ---------------------------------------------------------------- learned quantizer parameters


@dataclass(frozen=True)
class LearnedParameter:
    """A quantizer parameter trained beside the network: its attribute, the QuantSpec field holding its
    weight decay, its optimizer group's name, and the QuantSpec field of its learning-rate multiplier (None:
    the network's rate)."""

    attribute: str
    decay_field: str
    group: str
    lr_scale_field: str | None = None


LEARNED_PARAMETERS: dict[type[nn.Module], LearnedParameter] = {
    LSQQuantizer: LearnedParameter("step", "quantizer_weight_decay", "lsq_steps", "quantizer_lr_scale"),
    PACTQuantizer: LearnedParameter("alpha", "pact_alpha_decay", "pact_alphas"),
}


@torch.no_grad()
def weight_noise_statistics(weight: torch.Tensor, quantizer: nn.Module) -> tuple[float, float]:
    """(mean square of the weight quantization noise delta, the uniform-noise prediction Delta^2 / 12).

    delta is Q(w) minus what the straight-through estimator treats as the identity (each method's `noise`
    model). One statistic for every method, the mean square E[delta^2] (not the variance about delta's mean):
    it is what the matched-noise control injects, and what Theorem 3.1's sigma^2 stands for.
    """
    model = next((m.noise for m in REGISTRY.values()
                  if m.noise is not None and m.weight_class is not None and isinstance(quantizer, m.weight_class)),
                 None)
    if model is None:
        raise QuantSpecError(f"no noise model for {type(quantizer).__name__}")
    delta, step_squared = model(weight, quantizer)
    return float(delta.pow(2).mean()), float(step_squared / 12)
