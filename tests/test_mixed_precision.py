"""Fake quantization under autocast: float32 levels and float32 step/alpha gradients, whatever the autocast dtype.

Each quantizer gets a bfloat16 input under `torch.autocast("cpu", dtype=torch.bfloat16)` and the very same
values as float32 without autocast; the bfloat16 result must be the float32 result cast to bfloat16 (bitwise),
and the gradients to steps and alphas must agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from quantizers import DoReFaActQuantizer, DoReFaWeightQuantizer, GaussianWeightNoise, LSQQuantizer, PACTQuantizer
from quantizers.lsq import _lsq_traceable
from quantizers.pact import _pact_traceable
from records.store import read_rows


def _lsq(activation: bool, per_channel: bool = False) -> LSQQuantizer:
    q = LSQQuantizer(4, signed=not activation, num_channels=8 if per_channel else None, activation=activation)
    with torch.no_grad():
        q.step.copy_(torch.linspace(0.05, 0.2, 8) if per_channel else torch.tensor(0.0731))
    q.mark_ready()
    return q


def _inputs(signed: bool) -> torch.Tensor:
    """Weights (signed) of 8 output channels, or a batch of post-ReLU activations, as bfloat16 values."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 3, 3) * 0.4 if signed else torch.randn(16, 8, 6, 6).abs() * 0.6
    return x.bfloat16()


QUANTIZERS = {
    "lsq activation": (lambda: _lsq(activation=True), False, "step"),
    "lsq weight": (lambda: _lsq(activation=False), True, "step"),
    "lsq weight per channel": (lambda: _lsq(activation=False, per_channel=True), True, "step"),
    "pact": (lambda: PACTQuantizer(4, alpha=1.3), False, "alpha"),
    "dorefa activation": (lambda: DoReFaActQuantizer(4), False, None),
    "dorefa weight": (lambda: DoReFaWeightQuantizer(4, rescale=True), True, None),
}


def _run(quantizer, x: torch.Tensor, upstream: torch.Tensor, traceable: bool = False):
    x = x.clone().requires_grad_()
    if traceable and isinstance(quantizer, LSQQuantizer):
        out = _lsq_traceable(x, quantizer.step, quantizer.q_neg, quantizer.q_pos, quantizer.grad_scale(x))
    elif traceable:
        out = _pact_traceable(x, quantizer.alpha, quantizer.levels)
    else:
        out = quantizer(x)
    out.backward(upstream.to(out.dtype))
    grads = {name: p.grad.clone() for name, p in quantizer.named_parameters()}
    quantizer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _compare(quantizer, signed: bool, param: str | None, traceable: bool = False) -> None:
    x_low = _inputs(signed)
    upstream = torch.randn(x_low.shape).bfloat16().float()
    reference, reference_grad_x, reference_grads = _run(quantizer, x_low.float(), upstream, traceable)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grad_x, grads = _run(quantizer, x_low, upstream, traceable)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16)), "levels differ from the float32 path"
    assert torch.equal(grad_x, reference_grad_x.to(torch.bfloat16))
    if param is not None:
        torch.testing.assert_close(grads[param], reference_grads[param], rtol=1e-5, atol=0)
        assert reference_grads[param].abs().max() > 0


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizers_under_bf16_autocast_give_the_float32_levels_and_gradients(name):
    make, signed, param = QUANTIZERS[name]
    _compare(make(), signed, param)


@pytest.mark.parametrize("name", ["lsq activation", "lsq weight", "lsq weight per channel", "pact"])
def test_compile_traceable_forms_under_bf16_autocast_give_the_float32_levels_and_gradients(name):
    make, signed, param = QUANTIZERS[name]
    _compare(make(), signed, param, traceable=True)


def test_naive_bfloat16_rounding_would_put_values_on_other_levels():
    """The check above can fail: dividing in bfloat16 moves some values to a neighbouring level."""
    q = _lsq(activation=True)
    x = _inputs(signed=False)
    step_low = q.step.detach().bfloat16()
    naive = (x / step_low).clamp(0, q.q_pos).round() * step_low
    assert not torch.equal(naive, q(x.float()).bfloat16())


def test_matched_noise_under_autocast_keeps_float32_weights():
    weight = torch.randn(8, 4, 3, 3)
    noise = GaussianWeightNoise(4)
    torch.manual_seed(1)
    reference = noise(weight)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = noise(weight)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, reference)
    # A bfloat16 weight: the variance and the draw in float32 (exactly the float32 path on the same values),
    # only the result in bfloat16; a draw in bfloat16 would give other values.
    torch.manual_seed(1)
    low = noise(weight.bfloat16())
    torch.manual_seed(1)
    expected = noise(weight.bfloat16().float()).bfloat16()
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected)


@pytest.mark.parametrize("method", ["lsq", "pact_dorefa", "dorefa", "noise"])
def test_every_method_trains_a_step_under_bf16_autocast_with_float32_quantizer_state(method):
    """What Lightning's bf16-mixed plugin does to a step (autocast around the forward), for every method."""
    from lightning_modules.models import build_model
    from quantizers import QuantSpec, quantize_model

    torch.manual_seed(0)
    # PACT clipping at 1 (not 10) so that some activations reach alpha and it gets a gradient
    spec = QuantSpec(method=method, weight_bits=4, pact_alpha=1.0)
    net = quantize_model(build_model("resnet20", 10), spec).train()
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    assert logits.dtype == torch.bfloat16  # the classifier ran in bfloat16: autocast was in effect
    loss.backward()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    quantizer_params = [p for n, p in net.named_parameters() if n.endswith(("step", "alpha"))]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in quantizer_params)


def test_bf16_mixed_fit_through_the_cli(digits_fast_args, tmp_path):
    status = run_cli("fit", *digits_fast_args, "--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches",
                     "2", "--quantization.method", "pact_dorefa", "--quantization.weight_bits", "4")
    assert status == 0
    assert [r for r in read_rows(tmp_path / "run" / "results.jsonl") if r["corruption"] == "clean"]
    # the quantizer state the bf16 steps trained is float32 and moved from its initial value
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    alphas = [v for k, v in state.items() if k.endswith("alpha")]
    assert alphas and all(a.dtype == torch.float32 for a in alphas)
    assert any(a.item() != 10.0 for a in alphas)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_resnet20_lsq4"])
def test_bf16_mixed_digits_fit_reaches_90_percent(config, tmp_path):
    """10 of the config's 30 epochs (the milestones scale with them): on a CPU without native bfloat16 an epoch
    takes about 55 s here. Measured 2026-12-01: 97.50 % (10:17 in all)."""
    status = run_cli("fit", "--config", f"configs/{config}.yaml", "--trainer.precision", "bf16-mixed",
                     "--trainer.max_epochs", "10", "--flatness.enabled", "false",
                     "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
                     "--data.init_args.corrupted_test.corruptions", "[]")
    assert status == 0
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    (accuracy,) = [r["value"] for r in rows if r["metric"] == "accuracy" and r["corruption"] == "clean"]
    print(f"{config} bf16-mixed on CPU: clean test accuracy {accuracy:.2f} %")
    assert accuracy >= 90.0


def test_yolov5n_lsq_step_under_bf16_autocast():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import detection  # benchmarks/detection.py: a batch of synthetic rectangles (or VOC dev images) and a step

    batch, _ = detection.training_batch(64, 2)
    # one float32 step first: LSQ's activation steps initialise on it
    trainee = detection.Trainee("yolov5n", detection.methods("yolov5n")["lsq W4A4"], batch, 20, "cpu")
    trainee.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainee.loss()
    assert torch.isfinite(loss)
    loss.backward()
    steps = [p for n, p in trainee.net.named_parameters() if n.endswith("step")]
    assert steps and all(p.grad is not None and p.grad.dtype == torch.float32 for p in steps)
    assert all(torch.isfinite(p.grad).all() for p in steps)
