"""The method registry: per quantization method, what it quantizes, which quantizer each layer role gets, how
its weight noise is measured, and how reports name and colour it.

A new method is its quantizer class and one `register` call. The class derives from `quantizers.base.Quantizer`
(or `DataInitializedQuantizer`, whose scale is set from the weight or the first training batch) and states
there what the code around it needs: its `learned_parameters` (optimizer group, weight decay and learning-rate
multiplier, by QuantSpec field), `ready` / `mark_ready` for a first-batch initialisation, and `integer_grid`
(plus `packing_facts` / `weight_from_integers` when its levels are not `integer * scale` of its state) for
export. `QuantSpec`, the module swap, the optimizer groups, `torch.compile`, the noise statistics, the
callbacks, the detector's EMA copy, the exporters, the study grid and the report then read it from there and
from this registry; none of them names a quantizer class.

Also here, because every layer above prints or stores it: the precision label ('FP32', 'W4A4', 'W4') and
the convention that 32 bits in a results row means a float (unquantized) tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantizers.dorefa import DoReFaWeightQuantizer
from quantizers.errors import QuantSpecError
from quantizers.lsq import LSQQuantizer
from quantizers.noise import GaussianWeightNoise, lsq_quantization_error
from quantizers.pact import PACTQuantizer

FLOAT_BITS = 32  # how a float (unquantized) tensor's precision is written in a results row
FP32 = "fp32"

# The builders receive the run's `QuantSpec`, typed Any here: spec.py validates a method against this
# registry, so it imports this module and this module never imports it (one-way).
QuantSpecLike = Any
# (the layer's float weight, its bits, the spec, whether it is the network's last layer) -> weight quantizer
WeightBuilder = Callable[[torch.Tensor, int, QuantSpecLike, bool], nn.Module]
# (the layer's input bits, the spec) -> input quantizer
InputBuilder = Callable[[int, QuantSpecLike], nn.Module]
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


def _lsq_weight(weight: torch.Tensor, bits: int, spec: QuantSpecLike, is_last: bool) -> nn.Module:
    quantizer = LSQQuantizer(bits, signed=True, num_channels=weight.shape[0] if spec.per_channel else None)
    quantizer.to(weight.device)
    quantizer.initialize_from(weight.detach())
    return quantizer


def _lsq_input(bits: int, spec: QuantSpecLike) -> nn.Module:
    return LSQQuantizer(bits, signed=spec.act_signed, activation=True)


def _lsq_noise(weight: torch.Tensor, quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return quantizer(weight) - weight, quantizer.step.detach().clamp_min(1e-12).pow(2).mean()


def _dorefa_weight(weight: torch.Tensor, bits: int, spec: QuantSpecLike, is_last: bool) -> nn.Module:
    # DoReFa weights lie in [-1, 1]: the last layer has no BatchNorm after it to absorb that, so it keeps
    # its float scale (see DoReFaWeightQuantizer.rescale).
    return DoReFaWeightQuantizer(bits, per_channel=spec.per_channel, rescale=is_last)


def _dorefa_noise(weight: torch.Tensor, quantizer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # Against the unrounded DoReFa transform tanh(w) / max|tanh(w)|, whose output lives in [-1, 1].
    unrounded, rounded = quantizer.unrounded_and_rounded(weight)
    return rounded - unrounded, torch.tensor((2.0 / (2**quantizer.bits - 1)) ** 2)


def _pact_input(bits: int, spec: QuantSpecLike) -> nn.Module:
    return PACTQuantizer(bits, alpha=spec.pact_alpha)


def _matched_noise_weight(weight: torch.Tensor, bits: int, spec: QuantSpecLike, is_last: bool) -> nn.Module:
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
