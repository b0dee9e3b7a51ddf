"""Apply a `QuantSpec` to any `nn.Module` by swapping Conv2d/Linear layers for quantized ones.

The swap is idempotent (the spec it applied is recorded on the model, and applying the same spec again is a
no-op), keeps the float Parameters, and creates every quantizer parameter with its final shape, so
`quantize_model(fresh_model, spec).load_state_dict(trained_state)` restores a trained quantized model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from quantizers.base import LearnedParameter, Quantizer
from quantizers.errors import QuantSpecError
from quantizers.layers import QUANTIZED_LAYERS, QuantConv2d, QuantLinear
from quantizers.methods import method, weight_noise_statistics
from quantizers.spec import QuantSpec

_SPEC_ATTRIBUTE = "_qreg_quant_spec"


@dataclass(frozen=True)
class LayerPlan:
    """What the swap does to one layer: weight and input bits (None = left in float)."""

    name: str
    weight_bits: int | None
    act_bits: int | None
    is_last: bool


def applied_spec(model: nn.Module) -> QuantSpec:
    """The spec a model was quantized with (an FP32 spec for a model never quantized)."""
    return getattr(model, _SPEC_ATTRIBUTE, None) or QuantSpec()


def _matches(name: str, patterns) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def plan_layers(model: nn.Module, spec: QuantSpec) -> list[LayerPlan]:
    """Decide the bits of every Conv2d/Linear; raise if a pattern in the spec matches no layer."""
    candidates = [
        name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear) and name
    ]
    for field_name, patterns in (("exclude", spec.exclude), ("layer_bits", spec.layer_bits)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
                example = candidates[0] if candidates else "none"
                raise QuantSpecError(
                    f"quantization.{field_name} pattern {pattern!r} matches no Conv2d/Linear layer "
                    f"(layers are named like {example!r})"
                )
    names = [n for n in candidates if _matches(n, spec.exclude) is None]
    if not names:
        raise QuantSpecError("the model has no Conv2d or Linear layer to quantize")
    first, last = names[0], names[-1]
    plans = []
    for name in names:
        override = _matches(name, spec.layer_bits)
        if override is not None:
            weight_bits = act_bits = spec.layer_bits[override]
        elif name == first:
            # The first layer reads the image, which is already 8-bit data: only its weights are quantized.
            weight_bits, act_bits = spec.first_layer_bits, None
        elif name == last:
            weight_bits = act_bits = spec.last_layer_bits
        else:
            weight_bits, act_bits = spec.weight_bits, spec.effective_act_bits
        if not spec.quantizes_activations:
            act_bits = None
        plans.append(LayerPlan(name, weight_bits, act_bits, is_last=name == last))
    return plans


def _weight_quantizer(layer: nn.Module, plan: LayerPlan, spec: QuantSpec) -> nn.Module | None:
    build = method(spec.method).weight
    if plan.weight_bits is None or build is None:
        return None
    return build(layer.weight, plan.weight_bits, spec, plan.is_last)


def _input_quantizer(plan: LayerPlan, spec: QuantSpec, device: torch.device) -> nn.Module | None:
    build = method(spec.method).input
    if plan.act_bits is None or build is None:
        return None
    quantizer = build(plan.act_bits, spec)
    quantizer.layer_name = plan.name
    quantizer.expect_non_negative = not spec.act_signed
    return quantizer.to(device)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap the model's Conv2d/Linear layers for fake-quantized ones, in place; returns the model."""
    current = getattr(model, _SPEC_ATTRIBUTE, None)
    if current is not None:
        if current == spec:
            return model
        raise QuantSpecError(
            f"the model is already quantized as {current.describe()} and cannot be re-quantized as "
            f"{spec.describe()} ({current.describe_differences(spec, ('applied', 'asked'))}; a checkpoint's "
            "quantization must match the config's)"
        )
    if not spec.quantized:
        return model
    for plan in plan_layers(model, spec):
        parent_name, _, child_name = plan.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child_name)
        weight_quantizer = _weight_quantizer(layer, plan, spec)
        input_quantizer = _input_quantizer(plan, spec, layer.weight.device)
        if weight_quantizer is None and input_quantizer is None:
            continue
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        setattr(parent, child_name, cls.from_float(layer, weight_quantizer, input_quantizer))
    setattr(model, _SPEC_ATTRIBUTE, spec)
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}


def _learned(module: nn.Module | None) -> tuple[LearnedParameter, ...]:
    """The parameters a quantizer trains (`Quantizer.learned_parameters`); none for any other module."""
    return module.learned_parameters if isinstance(module, Quantizer) else ()


def parameter_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Optimizer groups: network parameters, then each kind of learned quantizer parameter (LSQ steps, PACT
    alphas: each quantizer's `learned_parameters`) in a group of its own with the weight decay its spec field
    gives and its learning-rate multiplier (`lr_scale`; the group's `lr` is `lr * lr_scale` when `lr` is given;
    a schedule that sets the rates itself multiplies by `lr_scale`).

    Quantizer parameters must exist before the optimizer is built, or they never train.
    """
    spec = applied_spec(model)
    learned: dict[str, tuple[float, float, list[nn.Parameter]]] = {}
    for module in model.modules():
        for entry in _learned(module):
            decay = getattr(spec, entry.decay_field)
            scale = getattr(spec, entry.lr_scale_field) if entry.lr_scale_field else 1.0
            learned.setdefault(entry.group, (decay, scale, []))[2].append(getattr(module, entry.attribute))
    special = {id(p) for *_, params in learned.values() for p in params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in special], "weight_decay": weight_decay}]
    for name, (decay, scale, params) in learned.items():
        group = {"params": params, "weight_decay": decay, "name": name, "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


@torch.no_grad()
def quantizer_state(model: nn.Module) -> dict[str, float]:
    """Learned quantizer parameters by name, e.g. `<layer>.weight_quantizer.step` (mean over channels)."""
    state = {}
    for name, layer in quantized_layers(model).items():
        for role in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(layer, role)
            for entry in _learned(quantizer):
                state[f"{name}.{role}.{entry.attribute}"] = getattr(quantizer, entry.attribute).mean().item()
    return state


@torch.no_grad()
def weight_quantization_noise(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per layer, (mean square of the weight quantization noise, its uniform-noise prediction Delta^2 / 12)."""
    return {
        name: weight_noise_statistics(layer.weight, layer.weight_quantizer)
        for name, layer in quantized_layers(model).items()
        if layer.weight_quantizer is not None
    }
