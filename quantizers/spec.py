"""`QuantSpec`: everything that decides how a run is quantized, validated when it is built.

A spec is plain data so it can live in a YAML config, a checkpoint and a results row. Every choice that
libraries disagree on (README, "The choices libraries disagree on") is a field here, with the
default the LSQ and PACT papers use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from quantizers.errors import QuantSpecError
from quantizers.methods import FLOAT_BITS, REGISTRY, precision_label

# The methods registered when the package loads (quantizers.methods); a method registered later is accepted too.
METHODS = tuple(REGISTRY)
MIN_BITS, MAX_BITS = 2, 8
# Where a checkpoint carries the spec its model was quantized with.
CHECKPOINT_KEY = "quantization"


def _shown(value: Any) -> str:
    """A field's value as a config writes it: null, true/false, [a, b], {pattern: bits}."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list | tuple):
        return f"[{', '.join(_shown(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def _check_bits(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        keep_float = " (or null to keep the layer in float)" if allow_none else ""
        raise QuantSpecError(
            f"quantization.{name} must be an integer from {MIN_BITS} to {MAX_BITS}{keep_float}, got {value!r}"
        )


@dataclass(frozen=True)
class QuantSpec:
    """How to fake-quantize a network.

    Args:
        method: fp32 (no quantization), lsq (LSQ weights and activations), pact_dorefa (PACT activations,
            DoReFa weights), dorefa (DoReFa weights only), or noise: the matched-noise control, full precision
            with Gaussian weight noise of the variance of weight_bits-bit quantization noise, in training only.
        weight_bits: bit width of the weights of every quantized layer but the first and last.
        act_bits: bit width of the layers' input activations; null means the same as weight_bits.
            Ignored by dorefa, which quantizes weights only.
        first_layer_bits: bits of the first Conv2d/Linear (weights; its input is the 8-bit image and is not
            fake-quantized); null keeps it in float. 8 by default, as in the LSQ and PACT papers.
        last_layer_bits: bits of the last Conv2d/Linear (weights and input); null keeps it in float.
        per_channel: one weight step (LSQ) or max (DoReFa) per output channel instead of per tensor.
        act_signed: use signed LSQ activation grids (networks whose layer inputs can be negative, e.g.
            SiLU); the default unsigned grid suits post-ReLU inputs and is checked on the first batch.
        quantizer_weight_decay: weight decay on LSQ step sizes (and on the learned parameters of any quantizer
            whose `LearnedParameter` names this field). Off by default: in a study about regularization, a hidden
            regularizer on the quantizer would confound the result.
        quantizer_lr_scale: learning-rate multiplier of the LSQ step sizes (their optimizer group; also of any
            quantizer parameter whose `LearnedParameter` names this field). 0.1 by
            default: trained from scratch at the paper's lr 0.1, a layer's step (one value that re-quantizes the
            whole layer) drifted towards zero in the first epochs and one gradient then threw it hundreds of times
            its size, rounding every weight to zero for good (docs/lsq_step.md); at lr x 0.1 (the LSQ paper's
            0.01) no run of the same test did. 1 trains the steps at the network's rate.
        pact_alpha: initial PACT clipping level.
        pact_alpha_decay: PACT's own L2 penalty on alpha (its own optimizer group).
        exclude: module-name patterns (fnmatch) never quantized.
        layer_bits: module-name pattern -> bits (null = float) overriding the rules above.
    """

    method: str = "fp32"
    weight_bits: int = 8
    act_bits: int | None = None
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    per_channel: bool = False
    act_signed: bool = False
    quantizer_weight_decay: float = 0.0
    quantizer_lr_scale: float = 0.1
    pact_alpha: float = 10.0
    pact_alpha_decay: float = 2e-4
    exclude: tuple[str, ...] = ()
    layer_bits: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in REGISTRY:
            raise QuantSpecError(
                f"unknown quantization method {self.method!r}; choose one of: {', '.join(REGISTRY)}"
            )
        _check_bits(self.weight_bits, "weight_bits")
        _check_bits(self.act_bits, "act_bits", allow_none=True)
        _check_bits(self.first_layer_bits, "first_layer_bits", allow_none=True)
        _check_bits(self.last_layer_bits, "last_layer_bits", allow_none=True)
        for pattern, bits in self.layer_bits.items():
            _check_bits(bits, f"layer_bits[{pattern!r}]", allow_none=True)
        for name in ("quantizer_weight_decay", "pact_alpha_decay"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise QuantSpecError(f"quantization.{name} must be a number >= 0, got {value!r}")
        scale = self.quantizer_lr_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < float("inf"):
            raise QuantSpecError(f"quantization.quantizer_lr_scale must be a number > 0, got {scale!r}")
        if not isinstance(self.pact_alpha, int | float) or not self.pact_alpha > 0:
            raise QuantSpecError(f"quantization.pact_alpha must be > 0, got {self.pact_alpha!r}")
        if self.act_signed and not REGISTRY[self.method].signed_inputs:
            raise QuantSpecError(
                f"method {self.method}'s activation grid clips activations at 0 and cannot be signed; use method lsq "
                "with act_signed, or dorefa (weights only)"
            )
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))

    @property
    def quantized(self) -> bool:
        return REGISTRY[self.method].quantized

    @property
    def quantizes_activations(self) -> bool:
        return REGISTRY[self.method].quantizes_activations

    @property
    def effective_act_bits(self) -> int | None:
        """Bits of the activations of the body layers, or None when activations stay float."""
        if not self.quantizes_activations:
            return None
        return self.weight_bits if self.act_bits is None else self.act_bits

    @property
    def recorded_bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the body layers as a results row records them, 32 for float."""
        return (self.weight_bits if self.quantized else FLOAT_BITS), (self.effective_act_bits or FLOAT_BITS)

    def describe(self) -> str:
        """Short human label, e.g. 'lsq W4A4', 'dorefa W2' or 'noise W4' (noise matched to 4 bits); 'fp32'."""
        if not self.quantized:
            return self.method
        return f"{self.method} {precision_label(self.method, *self.recorded_bits)}"

    def describe_differences(self, other: QuantSpec, names: tuple[str, str] = ("checkpoint", "config")) -> str:
        """The fields in which two specs differ, each with both values, e.g. 'act_signed: checkpoint false,
        config true; per_channel: ...': two specs with the same `describe()` label can differ in fields it
        does not show (act_signed, per_channel, first/last layer bits, ...)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return "; ".join(f"{name}: {names[0]} {_shown(mine[name])}, {names[1]} {_shown(theirs[name])}"
                         for name in mine if mine[name] != theirs[name])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantSpecError(f"unknown quantization field(s): {', '.join(unknown)}")
        return cls(**data)
