"""The quantizers against their papers' formulas (LSQ, PACT, DoReFa): forward values, gradients, inits."""

from __future__ import annotations

import math

import pytest
import torch

from quantizers import DoReFaActQuantizer, DoReFaWeightQuantizer, LSQQuantizer, PACTQuantizer, QuantSpecError
from quantizers.lsq import lsq_grid

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


def lsq_with_step(bits: int, signed: bool, step: float, activation: bool = False) -> LSQQuantizer:
    quantizer = LSQQuantizer(bits, signed, activation=activation)
    with torch.no_grad():
        quantizer.step.fill_(step)
    quantizer.mark_ready()
    return quantizer


# ---------------------------------------------------------------- LSQ


def test_lsq_grids_are_full_signed_and_unsigned():
    assert lsq_grid(2, signed=True) == (2, 1)  # {-2, -1, 0, 1}
    assert lsq_grid(4, signed=True) == (8, 7)
    assert lsq_grid(2, signed=False) == (0, 3)
    assert lsq_grid(8, signed=False) == (0, 255)


def test_lsq_forward_on_known_values():
    quantizer = lsq_with_step(2, signed=True, step=0.5)
    x = torch.tensor([-2.0, -0.9, -0.3, 0.2, 0.35, 0.6, 1.0])
    # v = x/s = [-4, -1.8, -0.6, 0.4, 0.7, 1.2, 2] -> clip [-2, 1] -> round -> times s
    expected = torch.tensor([-1.0, -1.0, -0.5, 0.0, 0.5, 0.5, 0.5])
    torch.testing.assert_close(quantizer(x), expected)

    unsigned = lsq_with_step(2, signed=False, step=0.25)
    x = torch.tensor([-0.3, 0.0, 0.1, 0.3, 0.55, 2.0])
    # v = [-1.2, 0, 0.4, 1.2, 2.2, 8] -> clip [0, 3] -> round -> [0, 0, 0, 1, 2, 3]
    torch.testing.assert_close(unsigned(x), torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 0.75]))


@pytest.mark.parametrize(
    ("values", "region"),
    [([0.13, -0.41, 0.26, 0.05], "inside"), ([-1.3, -2.0, -1.01], "below"), ([0.8, 1.7, 0.9], "above")],
)
def test_lsq_gradients_inside_below_above_with_scale(values, region):
    bits, step = 3, 0.2  # signed grid [-4, 3]: inside means -0.8 < x < 0.6
    q_neg, q_pos = lsq_grid(bits, signed=True)
    quantizer = lsq_with_step(bits, signed=True, step=step)
    x = torch.tensor(values, requires_grad=True)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0][: len(values)])
    quantizer(x).backward(upstream)

    v = torch.tensor(values) / step
    if region == "inside":
        d_x, d_s = torch.ones_like(v), v.round() - v
    elif region == "below":
        d_x, d_s = torch.zeros_like(v), torch.full_like(v, -q_neg)
    else:
        d_x, d_s = torch.zeros_like(v), torch.full_like(v, q_pos)
    g = 1 / math.sqrt(len(values) * q_pos)  # weight quantizer: N = number of elements
    torch.testing.assert_close(x.grad, upstream * d_x)
    torch.testing.assert_close(quantizer.step.grad, (upstream * d_s).sum() * g)


def test_lsq_activation_gradient_scale_counts_features_per_sample():
    quantizer = lsq_with_step(4, signed=False, step=0.1, activation=True)
    x = torch.rand(8, 3, 4, 4, requires_grad=True)
    quantizer(x).sum().backward()
    v = x.detach() / 0.1
    inside = (v > 0) & (v < 15)
    d_s = torch.where(inside, v.round() - v, v.clamp(0, 15)).sum()
    torch.testing.assert_close(quantizer.step.grad, d_s / math.sqrt(3 * 4 * 4 * 15))


def _memory_formats(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


@pytest.mark.parametrize(("x_layout", "grad_layout"), [("contiguous", "contiguous"),
                                                        ("channels_last", "channels_last"),
                                                        ("channels_last", "contiguous")])
def test_lsq_step_gradient_in_every_memory_layout(x_layout, grad_layout):
    """The CPU backward builds the step gradient in a reused scratch buffer over the tensors' storage order
    (contiguous or channels_last), and falls back to plain ops when the layouts differ. Two activation sizes in
    turn, the smaller second, so a reused buffer longer than the tensor is exercised too."""
    torch.manual_seed(1)
    for shape in [(4, 6, 5, 5), (2, 6, 3, 3)]:
        quantizer = lsq_with_step(3, signed=True, step=0.25, activation=True)  # inside: -1.0 < x < 0.75
        x = _memory_formats(torch.randn(shape) * 0.8, x_layout).requires_grad_()
        upstream = _memory_formats(torch.randn(shape), grad_layout)
        quantizer(x).backward(upstream)
        v = x.detach() / 0.25
        inside = (v > -4) & (v < 3)
        assert inside.any() and not inside.all()
        d_s = torch.where(inside, v.round() - v, v.clamp(-4, 3))
        g = 1 / math.sqrt(x[0].numel() * 3)
        torch.testing.assert_close(x.grad, upstream * inside)
        torch.testing.assert_close(quantizer.step.grad, (upstream * d_s).sum() * g, rtol=1e-5, atol=1e-6)


def test_lsq_matches_the_common_straight_through_implementation():
    """Same values and gradients as `(x.round() - x).detach() + x` with a gradient-scaled step."""
    torch.manual_seed(0)
    x = torch.randn(64, 10) * 0.7
    step0, bits = 0.11, 4
    q_neg, q_pos = lsq_grid(bits, signed=True)
    g = 1 / math.sqrt(x.numel() * q_pos)

    ours = lsq_with_step(bits, signed=True, step=step0)
    x1 = x.clone().requires_grad_()
    ours(x1).pow(2).sum().backward()

    s = torch.tensor(step0, requires_grad=True)
    x2 = x.clone().requires_grad_()
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x2 / s_scaled, -q_neg, q_pos)
    reference = ((v.round() - v).detach() + v) * s_scaled
    reference.pow(2).sum().backward()

    torch.testing.assert_close(ours(x), reference.detach())
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.step.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_lsq_weight_init_at_creation_and_per_channel():
    weight = torch.randn(6, 3, 3, 3)
    per_tensor = LSQQuantizer(4, signed=True)
    per_tensor.initialize_from(weight)
    torch.testing.assert_close(per_tensor.step, 2 * weight.abs().mean() / math.sqrt(7))

    per_channel = LSQQuantizer(4, signed=True, num_channels=6)
    per_channel.initialize_from(weight)
    torch.testing.assert_close(per_channel.step, 2 * weight.abs().flatten(1).mean(1) / math.sqrt(7))
    weight.requires_grad_()
    per_channel(weight).sum().backward()
    assert per_channel.step.grad.shape == (6,)
    # per-channel N is one channel's weight count
    v = weight.detach() / per_channel.step.detach().view(-1, 1, 1, 1)
    inside = (v > -8) & (v < 7)
    d_s = torch.where(inside, v.round() - v, v.clamp(-8, 7)).flatten(1).sum(1)
    torch.testing.assert_close(per_channel.step.grad, d_s / math.sqrt(27 * 7))


def test_lsq_activation_init_on_first_training_batch_not_in_eval():
    quantizer = LSQQuantizer(4, signed=False, activation=True)
    x = torch.rand(16, 8) * 3
    quantizer.eval()
    assert torch.equal(quantizer(x), x)  # e.g. Lightning's sanity check: pass-through, no init
    assert not bool(quantizer.initialized)
    quantizer.train()
    quantizer(x)
    assert bool(quantizer.initialized)
    torch.testing.assert_close(quantizer.step.detach(), 2 * x.abs().mean() / math.sqrt(15))
    quantizer(x * 10)  # a later batch does not re-initialise
    torch.testing.assert_close(quantizer.step.detach(), 2 * x.abs().mean() / math.sqrt(15))


def test_lsq_step_is_kept_positive_without_losing_its_gradient():
    quantizer = lsq_with_step(4, signed=True, step=-0.05)
    x = torch.randn(10, requires_grad=True)
    y = quantizer(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert quantizer.step.grad is not None and torch.isfinite(quantizer.step.grad)


def test_unsigned_lsq_refuses_negative_activations():
    quantizer = LSQQuantizer(4, signed=False, activation=True)
    quantizer.layer_name = "layer1.0.conv1"
    quantizer.expect_non_negative = True  # as set by the module swap
    with pytest.raises(QuantSpecError, match="layer1.0.conv1 receives negative inputs"):
        quantizer.train()(torch.randn(4, 8))


def test_lsq_rejects_bit_widths_below_two():
    with pytest.raises(QuantSpecError):
        LSQQuantizer(1, signed=True)


# ---------------------------------------------------------------- PACT


def test_pact_forward_and_gradients():
    quantizer = PACTQuantizer(bits=2, alpha=3.0)  # 3 levels: step alpha / 3 = 1
    x = torch.tensor([-1.0, 0.0, 0.4, 1.6, 2.9, 3.0, 5.0], requires_grad=True)
    y = quantizer(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0]))
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    y.backward(upstream)
    # d/dx = 1 on [0, alpha); d/dalpha = 1 where x >= alpha
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]))
    torch.testing.assert_close(quantizer.alpha.grad, torch.tensor(6.0 + 7.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pact_alpha_gradient_in_both_memory_layouts(layout):
    torch.manual_seed(2)
    quantizer = PACTQuantizer(bits=3, alpha=1.0)
    x = _memory_formats(torch.rand(3, 4, 5, 5) * 1.6, layout).requires_grad_()
    upstream = _memory_formats(torch.randn(3, 4, 5, 5), layout)
    quantizer(x).backward(upstream)
    above = x.detach() >= 1.0
    assert above.any() and not above.all()
    torch.testing.assert_close(quantizer.alpha.grad, upstream[above].sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, upstream * ~above)


def test_pact_levels_follow_alpha():
    quantizer = PACTQuantizer(bits=4, alpha=1.5)
    y = quantizer(torch.linspace(-1, 3, 1001))
    levels = torch.unique(y)
    assert len(levels) == 16
    torch.testing.assert_close(levels, torch.arange(16) * 1.5 / 15)


# ---------------------------------------------------------------- DoReFa


def test_dorefa_two_bit_weights_have_four_levels_without_zero():
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3) * 0.1
    levels = torch.unique(DoReFaWeightQuantizer(2)(w))
    torch.testing.assert_close(levels, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_dorefa_weights_match_the_formula_and_straight_through_gradient():
    torch.manual_seed(1)
    w = (torch.randn(8, 5) * 0.3).requires_grad_()
    bits, levels = 4, 15
    t = torch.tanh(w.detach())
    r = t / (2 * t.abs().max()) + 0.5
    expected = 2 * torch.round(r * levels) / levels - 1
    w_q = DoReFaWeightQuantizer(bits)(w)
    torch.testing.assert_close(w_q, expected)
    upstream = torch.randn_like(w)
    w_q.backward(upstream)
    # Straight-through round: the gradient is that of the unrounded map 2 r(w) - 1 = tanh(w) / max|tanh(w)|.
    w2 = w.detach().clone().requires_grad_()
    (torch.tanh(w2) / torch.tanh(w2).abs().max()).backward(upstream)
    torch.testing.assert_close(w.grad, w2.grad)


def test_dorefa_rescale_keeps_the_float_scale():
    w = torch.randn(10, 64) * 0.05
    w_q = DoReFaWeightQuantizer(8, rescale=True)(w)
    assert w_q.abs().max() == pytest.approx(w.abs().max().item(), rel=1e-5)


def test_dorefa_activations_forward_and_gradient():
    quantizer = DoReFaActQuantizer(bits=2)
    x = torch.tensor([-0.5, 0.0, 0.2, 0.5, 0.9, 1.0, 1.7], requires_grad=True)
    y = quantizer(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


# ---------------------------------------------------------------- the torch.compile formulations


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_traceable_form_matches_the_autograd_functions(signed, per_channel):
    """torch.compile traces `_lsq_traceable` instead of the Functions: same values, same gradients to rounding."""
    from quantizers.lsq import _lsq_traceable, _LSQFunction, _LSQPerChannelFunction

    torch.manual_seed(0)
    x = torch.randn(8, 5, 7) * 3
    x = x if signed else x.relu()
    step = torch.rand(8) * 0.3 + 0.2 if per_channel else torch.tensor(0.37)
    q_neg, q_pos = lsq_grid(3, signed)
    upstream = torch.randn_like(x)
    results = []
    for function in (_lsq_traceable, (_LSQPerChannelFunction if per_channel else _LSQFunction).apply):
        xs, steps = x.clone().requires_grad_(), step.clone().requires_grad_()
        out = function(xs, steps, q_neg, q_pos, 0.125)
        out.backward(upstream)
        results.append((out.detach(), xs.grad, steps.grad))
    (out_a, gx_a, gs_a), (out_b, gx_b, gs_b) = results
    assert torch.equal(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-6, atol=0)  # (g * s) / s: equal to rounding
    assert torch.equal(gx_a == 0, gx_b == 0)  # the same inside / outside masks
    torch.testing.assert_close(gs_a, gs_b, rtol=1e-5, atol=1e-6)
    assert (out_a != 0).any() and (gx_a == 0).any()  # the grid was exercised, clipping included


def test_pact_traceable_form_matches_the_autograd_function():
    from quantizers.pact import _pact_traceable, _PACTFunction

    torch.manual_seed(0)
    x = torch.cat([torch.rand(500) * 4, torch.zeros(20), torch.full((5,), 2.5)])  # zeros and x == alpha
    upstream = torch.randn_like(x)
    results = []
    for function in (_pact_traceable, _PACTFunction.apply):
        xs, alpha = x.clone().requires_grad_(), torch.tensor(2.5, requires_grad=True)
        out = function(xs, alpha, 15)
        out.backward(upstream)
        results.append((out.detach(), xs.grad, alpha.grad))
    (out_a, gx_a, ga_a), (out_b, gx_b, ga_b) = results
    assert torch.equal(out_a, out_b)
    nonzero = x != 0  # x = 0 gets no gradient in the traced form (a ReLU output of 0 receives none anyway)
    torch.testing.assert_close(gx_a[nonzero], gx_b[nonzero], rtol=1e-6, atol=0)
    assert torch.equal(gx_a[nonzero] == 0, gx_b[nonzero] == 0)
    torch.testing.assert_close(ga_a, ga_b)
    assert ga_b.item() != 0
