"""LSQ: learned step size quantization (Esser et al., ICLR 2020).

Forward `v_hat = round(clip(v / s, -Qn, Qp)) * s`; backward is the paper's straight-through estimator,
written out explicitly in an autograd Function so the gradients read like the paper's formulas below and
cost a few fused passes instead of a chain of small eager ops:

    d v_hat / d v = 1                      if -Qn < v/s < Qp, else 0
    d v_hat / d s = round(v/s) - v/s       inside,  -Qn below,  Qp above
    gradient of s scaled by g = 1 / sqrt(N * Qp)

N is the number of elements one step size quantizes: the layer's weight count (or a channel's, per-channel)
for weights, and the features of *one sample* for activations (the paper's intent; many implementations
use the whole batch's numel, which makes the effective step learning rate depend on the batch size).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from quantizers.base import DataInitializedQuantizer, LearnedParameter
from quantizers.errors import QuantSpecError, check_non_negative
from quantizers.grid import IntegerGrid, NoIntegerGrid
from quantizers.straight_through import in_float32, pass_between, step_gradient_sum

# Smallest step the forward pass uses; the stored parameter may dip below it without losing its gradient.
_MIN_STEP = 1e-8


def lsq_grid(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of the full integer grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _broadcast_step(step: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel step of shape (C,) viewed to broadcast over dim 0 of a weight tensor."""
    return step if step.dim() == 0 else step.view(-1, *([1] * (x.dim() - 1)))


def _lsq_levels(x: torch.Tensor, step: torch.Tensor, q_neg: int, q_pos: int) -> torch.Tensor:
    """round(clip(x/s, -Qn, Qp)) * s in float32, for a per-tensor step.

    One new tensor and three in-place passes; the clip is in units of the step, against the grid's integer ends
    as Python numbers (a clamp against 0-dim tensor bounds takes PyTorch's broadcasting path on CPU, 5x slower)."""
    return (in_float32(x) / step).clamp_(-q_neg, q_pos).round_().mul_(step)


class _LSQFunction(torch.autograd.Function):
    """Per-tensor LSQ in few passes, saving nothing the network does not keep alive anyway.

    With out = round(clip(x/s, -Qn, Qp)) * s, the step gradient summed over elements is
        sum(g * (round(v) - v) inside, -Qn below, Qp above) = sum(g * (out - x where inside, else out)) / s,
    since outside the range round(clip(v)) is the clipped level. x (the previous ReLU's output) and out (the
    next conv's input) are saved by those ops too, so saving them here costs no memory. A half-precision x
    (autocast) is quantized in float32 and the levels handed back in x's dtype; its backward recomputes the
    float32 levels from x rather than keeping a float32 copy alive.
    """

    @staticmethod
    def forward(ctx, x, step, q_neg, q_pos, grad_scale):
        out = _lsq_levels(x, step, q_neg, q_pos)
        ctx.save_for_backward(x, out if out.dtype == x.dtype else None, step)
        ctx.grid = (q_neg, q_pos, grad_scale)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, out, step = ctx.saved_tensors
        q_neg, q_pos, grad_scale = ctx.grid
        x_32, grad_32 = in_float32(x), in_float32(grad_out)
        if out is None:  # half-precision input: its float32 levels were not kept, rebuild them once
            out = _lsq_levels(x_32, step, q_neg, q_pos)
        low, high = -q_neg * step, q_pos * step
        grad_x = pass_between(grad_32, x_32, low, high)
        grad_step = step_gradient_sum(grad_32, out, x_32, low, high)
        return grad_x.to(x.dtype), grad_step / step * grad_scale, None, None, None


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first, in place of flatten(1).sum(1) (a copy for a channels_last weight)."""
    return t.sum(dim=tuple(range(1, t.dim())))


class _LSQPerChannelFunction(torch.autograd.Function):
    """Per-channel LSQ for weights (small tensors): the formulas written out directly, in float32."""

    @staticmethod
    def forward(ctx, x, step, q_neg, q_pos, grad_scale):
        s = _broadcast_step(step, x)
        ctx.save_for_backward(x, step)
        ctx.grid = (q_neg, q_pos, grad_scale)
        return (in_float32(x) / s).clamp_(-q_neg, q_pos).round_().mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, step = ctx.saved_tensors
        q_neg, q_pos, grad_scale = ctx.grid
        grad_32 = in_float32(grad_out)
        v = in_float32(x) / _broadcast_step(step, x)
        inside = (v > -q_neg) & (v < q_pos)
        # round(v) - v inside; the clipped level (-Qn or Qp) outside.
        d_step = torch.where(inside, v.round() - v, v.clamp(-q_neg, q_pos))
        grad_step = _channel_sum(grad_32 * d_step)
        return (grad_32 * inside).to(x.dtype), grad_step * grad_scale, None, None, None


def _lsq_traceable(x, step, q_neg, q_pos, grad_scale):
    """The Functions' quantizer as the textbook chain of differentiable ops, for torch.compile.

    Inductor fuses these with the neighbouring conv / BatchNorm / ReLU kernels, forward and backward, which
    it cannot do across an autograd Function's hand-written backward (ResNet20 LSQ W4A4, batch 128, 2 CPU
    cores: 1.21x of compiled FP32 this way, 1.63x through the Functions; a variant with explicit masks was
    slower still). Forward values are the Functions' bit for bit (v + (round(v) - v) is exactly round(v));
    gradients agree to rounding, since autograd multiplies by s and divides by it again. Half-precision
    inputs are quantized in float32 and handed back in their own dtype, as by the Functions.
    """
    dtype, x = x.dtype, in_float32(x)
    s = _broadcast_step(step, x)
    scaled = s * grad_scale
    s = s.detach() + (scaled - scaled.detach())  # the value of s, its gradient times g
    v = (x / s).clamp(-q_neg, q_pos)  # clamp with number bounds: open interval, as the Functions
    return ((v + (v.round() - v).detach()) * s).to(dtype)


class LSQQuantizer(DataInitializedQuantizer):
    """Fake-quantizes a tensor onto an LSQ grid with a learned step size.

    Weights are initialised at creation (`initialize_from`), activations on the first forward pass in
    training mode, so Lightning's sanity-check validation (eval mode) never sets a data-dependent step.
    Until then an activation quantizer passes its input through unchanged. Under DDP the initial step is
    averaged over ranks so every replica starts from the same value.
    """

    learned_parameters = (LearnedParameter("step", "lsq_steps", "quantizer_weight_decay", "quantizer_lr_scale"),)

    def __init__(
        self, bits: int, signed: bool, num_channels: int | None = None, activation: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 2:
            raise QuantSpecError(f"LSQ needs an integer bit width >= 2, got {bits!r}")
        self.bits = bits
        self.signed = signed
        self.q_neg, self.q_pos = lsq_grid(bits, signed)
        self.activation = activation
        shape = () if num_channels is None else (num_channels,)
        self.step = nn.Parameter(torch.ones(shape))

    def extra_repr(self) -> str:
        grid = f"[{-self.q_neg}, {self.q_pos}]"
        per = f", channels={self.step.numel()}" if self.step.dim() else ""
        role = "activation" if self.activation else "weight"
        return f"{role}, bits={self.bits}, signed={self.signed}, grid={grid}{per}"

    @torch.no_grad()
    def initialize_from(self, values: torch.Tensor) -> None:
        """Set the step to LSQ's `2 * mean|v| / sqrt(Qp)` (per channel when the step is per channel)."""
        if self.activation and not self.signed:
            check_non_negative(values, self, "an unsigned LSQ grid", "set quantization.act_signed: true")
        values = in_float32(values)
        if self.step.dim() == 0:
            mean_abs = values.abs().mean()
        else:
            mean_abs = values.abs().mean(dim=tuple(range(1, values.dim())))
        step = 2 * mean_abs / math.sqrt(self.q_pos)
        # Activation steps are set after DDP has broadcast the parameters, so the replicas must agree here;
        # weight steps are set before the wrap and then broadcast from rank 0 like any parameter.
        if self.activation and dist.is_available() and dist.is_initialized():
            dist.all_reduce(step)
            step /= dist.get_world_size()
        self.step.copy_(step.clamp_min(_MIN_STEP))
        self.mark_ready()

    def integer_grid(self, weight: torch.Tensor | None = None) -> IntegerGrid:
        """The full b-bit grid at the step the forward pass uses (the stored step floored at `_MIN_STEP`)."""
        if not self._initialized:
            role = "activation " if self.activation else ""
            raise NoIntegerGrid(f"its LSQ {role}step was never initialised (the model saw no training batch); "
                                "export a trained checkpoint")
        scale = self.step.detach().float().clamp_min(_MIN_STEP).clone()
        return IntegerGrid(self.bits, scale, -self.q_neg, self.q_pos, axis=0 if scale.dim() else None)

    def grad_scale(self, x: torch.Tensor) -> float:
        """g = 1 / sqrt(N * Qp); N per step: one sample's features, the layer's or one channel's weights."""
        per_step = x[0].numel() if (self.activation or self.step.dim()) else x.numel()
        return 1.0 / math.sqrt(per_step * self.q_pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            if not self.training:
                return x
            self.initialize_from(x)
        # Keep the step positive in the forward pass while letting its gradient through unchanged.
        step = self.step + (self.step.clamp_min(_MIN_STEP) - self.step).detach()
        if torch.compiler.is_compiling():
            return _lsq_traceable(x, step, self.q_neg, self.q_pos, self.grad_scale(x))
        function = _LSQFunction if step.dim() == 0 else _LSQPerChannelFunction
        return function.apply(x, step, self.q_neg, self.q_pos, self.grad_scale(x))
