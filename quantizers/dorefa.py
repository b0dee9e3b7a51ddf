"""DoReFa-Net quantizers (Zhou et al., 2016).

    quantize_k(r) = round((2^k - 1) * r) / (2^k - 1),  r in [0, 1], straight-through gradient
    weights:      w_q = 2 * quantize_k(tanh(w) / (2 * max|tanh(w)|) + 1/2) - 1      (in [-1, 1])
    activations:  a_q = quantize_k(clip(x, 0, 1))

The weight grid has no zero (2 bits: {-1, -1/3, 1/3, 1}) and ignores the float scale of w, which is harmless
before a BatchNorm but not in a classifier head; `rescale=True` multiplies the result by max|w| (no
gradient) so such a layer keeps its float scale.

On integers: the levels `2 q/(2^k-1) - 1` (q = 0..2^k-1) are `(2q - (2^k-1)) / (2^k-1)`, odd integers over
2^k-1, so the weight grid is the odd integers in [-(2^k-1), 2^k-1] (stride 2, no zero, no zero point).
"""

from __future__ import annotations

import torch

from quantizers.base import Quantizer
from quantizers.errors import QuantSpecError
from quantizers.grid import IntegerGrid, NoIntegerGrid
from quantizers.straight_through import RoundSTE, in_float32, pass_between


def quantize_k(r: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    return RoundSTE.apply(r * levels) / levels


def _check_bits(bits: int, name: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise QuantSpecError(f"{name} needs an integer bit width >= 1, got {bits!r}")


class DoReFaWeightQuantizer(Quantizer):
    """k-bit DoReFa weights; the max is over the whole tensor, or per output channel if `per_channel`."""

    def __init__(self, bits: int, per_channel: bool = False, rescale: bool = False) -> None:
        super().__init__()
        _check_bits(bits, "DoReFa weights")
        if bits == 1:
            raise QuantSpecError("1-bit DoReFa weights (sign with a mean scale) are not implemented; use >= 2")
        self.bits = bits
        self.per_channel = per_channel
        self.rescale = rescale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, rescale={self.rescale}"

    def _max(self, t: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return t.abs().amax(dim=tuple(range(1, t.dim())), keepdim=True)
        return t.abs().max()

    def unrounded_and_rounded(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tanh(w) / max|tanh(w)| and its k-bit quantization, both in [-1, 1] (before any rescale), in float32."""
        t = torch.tanh(in_float32(w))
        normalized = t / (2 * self._max(t)) + 0.5
        return 2 * normalized - 1, 2 * quantize_k(normalized, self.bits) - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w_q = self.unrounded_and_rounded(w)[1]
        if self.rescale:
            w_q = w_q * self._max(in_float32(w)).detach()
        return w_q.to(w.dtype)

    def integer_grid(self, weight: torch.Tensor | None = None) -> IntegerGrid:
        """Odd integers over 2^k-1; with `rescale`, times max|w| of `weight` (per channel if per_channel)."""
        levels = 2**self.bits - 1
        if not self.rescale:  # levels in [-1, 1] whatever the weights' scale
            return IntegerGrid(self.bits, torch.tensor(1.0 / levels), -levels, levels, stride=2)
        if weight is None:
            raise NoIntegerGrid("a rescaled DoReFa weight grid is max|w| / (2^b-1): it needs the layer's weight")
        max_abs = self._max(weight.detach().float())
        return IntegerGrid(self.bits, (max_abs.reshape(-1) if self.per_channel else max_abs) / levels,
                           -levels, levels, stride=2, axis=0 if self.per_channel else None)

    def packing_facts(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        # max|w| (per channel or not): the levels alone do not fix the weights' scale, nor the last layer's rescale
        return {"max_abs": self._max(weight.detach().float()).reshape(-1)}

    def weight_from_integers(self, integers: torch.Tensor, facts: dict[str, torch.Tensor]) -> torch.Tensor:
        """`sign * max|w|` where the level is extreme, `atanh(level * tanh(max|w|))` elsewhere: tanh(w) / max|tanh(w)|
        gives the level back, and max|w| (so the rescale of the last layer) is kept bit for bit."""
        levels = 2**self.bits - 1
        max_abs = facts["max_abs"]
        shape = [-1] + [1] * (integers.dim() - 1)
        top = max_abs.double().view(shape) if max_abs.numel() > 1 else max_abs.double().reshape(())
        inner = torch.atanh(integers.double() / levels * torch.tanh(top))
        extreme = integers.abs() == levels
        return torch.where(extreme, integers.sign().double() * top, inner).float()


class _DoReFaActFunction(torch.autograd.Function):
    """In float32 whatever x's dtype (see `straight_through.in_float32`), handed back in x's dtype."""

    @staticmethod
    def forward(ctx, x, levels):
        ctx.save_for_backward(x)
        return in_float32(x).clamp(0, 1).mul_(levels).round_().div_(levels).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        x_32, grad_32 = in_float32(x), in_float32(grad_out)
        return pass_between(grad_32, x_32, 0.0, 1.0, include_low=True, include_high=True).to(x.dtype), None


class DoReFaActQuantizer(Quantizer):
    """k-bit DoReFa activations on [0, 1]; gradient passes where 0 <= x <= 1 (clip's derivative)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        _check_bits(bits, "DoReFa activations")
        self.bits = bits
        self.levels = 2**bits - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DoReFaActFunction.apply(x, self.levels)
