"""PACT: parameterized clipping activation (Choi et al., 2018), for non-negative (post-ReLU) inputs.

    y   = clip(x, 0, alpha)
    y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)
    d y_q / d x     = 1 on [0, alpha), else 0
    d y_q / d alpha = 1 where x >= alpha, else 0

alpha is learned, one per layer, and carries PACT's own L2 penalty; the module swap puts it in an optimizer
group of its own (`pact_alpha_decay`) so that penalty stays separate from the network's weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizers.base import LearnedParameter, Quantizer
from quantizers.errors import QuantSpecError, check_non_negative
from quantizers.grid import IntegerGrid
from quantizers.straight_through import in_float32, pass_between, sum_where_at_least


class _PACTFunction(torch.autograd.Function):
    """PACT in float32 whatever x's dtype (see `straight_through.in_float32`), handed back in x's dtype."""

    @staticmethod
    def forward(ctx, x, alpha, levels):
        scale = alpha / levels
        ctx.save_for_backward(x, alpha)
        # The clip in units of the step against number ends (0, levels): the same levels as clip(x, 0, alpha) / scale
        # after rounding, without a clamp against a 0-dim tensor (PyTorch's slow broadcasting path on CPU).
        out = (in_float32(x) / scale).clamp_(0, levels).round_().mul_(scale)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, alpha = ctx.saved_tensors
        x_32, grad_32 = in_float32(x), in_float32(grad_out)
        grad_x = pass_between(grad_32, x_32, 0.0, alpha, include_low=True)  # [0, alpha)
        return grad_x.to(x.dtype), sum_where_at_least(grad_32, x_32, alpha), None


def _pact_traceable(x, alpha, levels):
    """_PACTFunction as plain differentiable ops without comparisons, for torch.compile.

    Inductor's CPU code for `x >= alpha` against a tensor is slow (a compiled where() took 3.7x its eager
    time), and it cannot fuse across an autograd Function's backward, so the clip is a clamp with number
    bounds in units of the step, and alpha's gradient (1 where x >= alpha) comes through floor(v / levels),
    which is 1 exactly there. Same values as the Function; gradients agree to rounding, except that x = 0
    gets none (a ReLU output of 0 receives no gradient anyway). See also `lsq._lsq_traceable`.
    """
    dtype, x = x.dtype, in_float32(x)
    alpha_value = alpha.detach()
    scale = alpha_value / levels
    v = (x / scale).clamp(0, levels)
    above = (v.detach() / levels).floor()
    return ((v + (v.round() - v).detach()) * scale + (alpha - alpha_value) * above).to(dtype)


class PACTQuantizer(Quantizer):
    """Unsigned k-bit activation quantizer with a learned clipping level alpha.

    Not ready until it has checked that its first training inputs are non-negative (or its state was loaded).
    """

    learned_parameters = (LearnedParameter("alpha", "pact_alphas", "pact_alpha_decay"),)

    def __init__(self, bits: int, alpha: float = 10.0) -> None:
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
            raise QuantSpecError(f"PACT needs an integer bit width >= 1, got {bits!r}")
        if not alpha > 0:
            raise QuantSpecError(f"PACT's initial alpha must be positive, got {alpha!r}")
        self.bits = bits
        self.levels = 2**bits - 1
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self._inputs_checked = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    @property
    def ready(self) -> bool:
        return self._inputs_checked

    def mark_ready(self) -> None:
        self._inputs_checked = True

    def integer_grid(self, weight: torch.Tensor | None = None) -> IntegerGrid:
        # The very division the forward pass makes (float32 alpha / int levels), so the scale is bit-identical.
        return IntegerGrid(self.bits, (self.alpha.detach() / self.levels).clone(), 0, self.levels)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Restored weights were trained on these inputs, which the check saw then: a network rebuilt from a
        # checkpoint (`test`, a resume) has no first-batch branch left, so `compile: true` compiles it at once.
        self._inputs_checked = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._inputs_checked:
            check_non_negative(x, self, "PACT (clip at 0)", "use method lsq with act_signed, or dorefa")
            self._inputs_checked = True
        if torch.compiler.is_compiling():
            return _pact_traceable(x, self.alpha, self.levels)
        return _PACTFunction.apply(x, self.alpha, self.levels)
