"""QuantSpec validation and the module swap: layer policy, idempotence, state_dict round trip, optimizer groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.models import build_model
from quantizers import (
    DoReFaWeightQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    QuantSpecError,
    applied_spec,
    parameter_groups,
    quantize_model,
    quantizer_state,
    weight_quantization_noise,
)

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


@pytest.mark.parametrize("bits", [0, 1, 9, 33, True, 4.0, "4"])
def test_spec_rejects_bits_out_of_range(bits):
    with pytest.raises(QuantSpecError, match="weight_bits must be an integer from 2 to 8"):
        QuantSpec(method="lsq", weight_bits=bits)


def test_spec_rejects_unknown_method_and_bad_fields():
    with pytest.raises(QuantSpecError, match="unknown quantization method 'lsqq'"):
        QuantSpec(method="lsqq")
    with pytest.raises(QuantSpecError, match="act_bits"):
        QuantSpec(method="lsq", act_bits=1)
    with pytest.raises(QuantSpecError, match="clips activations at 0"):
        QuantSpec(method="pact_dorefa", act_signed=True)
    with pytest.raises(QuantSpecError, match="quantizer_weight_decay"):
        QuantSpec(method="lsq", quantizer_weight_decay=-1)
    with pytest.raises(QuantSpecError, match="unknown quantization field"):
        QuantSpec.from_dict({"method": "lsq", "bits": 4})


def test_spec_round_trips_through_a_dict_and_describes_itself():
    spec = QuantSpec(method="lsq", weight_bits=4, exclude=("fc",), layer_bits={"layer1.*": 8})
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.describe() == "lsq W4A4"
    assert QuantSpec(method="dorefa", weight_bits=2).describe() == "dorefa W2"
    assert QuantSpec(method="pact_dorefa", weight_bits=4, act_bits=8).describe() == "pact_dorefa W4A8"


def test_lsq_swap_applies_the_first_and_last_layer_policy():
    model = quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", weight_bits=4))
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert model.conv1.weight_quantizer.bits == 8 and model.conv1.input_quantizer is None  # image input
    assert model.fc.weight_quantizer.bits == 8 and model.fc.input_quantizer.bits == 8
    body = model.layer2[0]
    assert body.conv1.weight_quantizer.bits == 4 and body.conv1.input_quantizer.bits == 4
    assert isinstance(body.shortcut[0], QuantConv2d)
    assert not body.conv1.input_quantizer.signed  # post-ReLU inputs: unsigned grid
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all(isinstance(m, QuantConv2d | QuantLinear) for m in convs)


def test_pact_dorefa_and_dorefa_swaps():
    model = quantize_model(build_model("resnet20", 10), QuantSpec(method="pact_dorefa", weight_bits=2))
    assert isinstance(model.layer1[0].conv1.weight_quantizer, DoReFaWeightQuantizer)
    assert isinstance(model.layer1[0].conv1.input_quantizer, PACTQuantizer)
    assert model.fc.weight_quantizer.rescale and not model.layer1[0].conv1.weight_quantizer.rescale

    weights_only = quantize_model(build_model("resnet20", 10), QuantSpec(method="dorefa", weight_bits=4))
    layers = [m for m in weights_only.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert layers and all(m.input_quantizer is None for m in layers)


def test_float_first_last_layers_exclusions_and_overrides():
    spec = QuantSpec(method="lsq", weight_bits=4, first_layer_bits=None, last_layer_bits=None,
                     exclude=("layer3.*",), layer_bits={"layer1.0.conv1": 2})
    model = quantize_model(build_model("resnet20", 10), spec)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert type(model.layer3[0].conv1) is nn.Conv2d
    assert model.layer1[0].conv1.weight_quantizer.bits == 2
    with pytest.raises(QuantSpecError, match="pattern 'nothing.*' matches no Conv2d/Linear"):
        quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", exclude=("nothing.*",)))


def test_swap_is_idempotent_and_refuses_a_different_spec():
    spec = QuantSpec(method="lsq", weight_bits=4)
    model = quantize_model(build_model("resnet20", 10), spec)
    layer = model.layer1[0].conv1
    quantize_model(model, QuantSpec(method="lsq", weight_bits=4))
    assert model.layer1[0].conv1 is layer
    assert applied_spec(model) == spec
    with pytest.raises(QuantSpecError, match="already quantized as lsq W4A4"):
        quantize_model(model, QuantSpec(method="lsq", weight_bits=8))
    fp32 = build_model("resnet20", 10)
    assert quantize_model(fp32, QuantSpec()) is fp32 and applied_spec(fp32) == QuantSpec()


def test_specs_with_the_same_label_name_the_fields_they_differ_in():
    """Two specs can differ only in fields the 'lsq W4A4' label does not show: a refusal names them, with both
    values, instead of 'trained as lsq W4A4 but the config asks for lsq W4A4'."""
    trained = QuantSpec(method="lsq", weight_bits=4)
    asked = QuantSpec(method="lsq", weight_bits=4, act_signed=True, last_layer_bits=None, exclude=("fc",))
    assert trained.describe() == asked.describe() == "lsq W4A4"
    assert trained.describe_differences(asked) == ("last_layer_bits: checkpoint 8, config null; act_signed: checkpoint "
                                                   "false, config true; exclude: checkpoint [], config [fc]")
    assert trained.describe_differences(trained) == ""
    model = quantize_model(build_model("resnet20", 10), trained)
    with pytest.raises(QuantSpecError) as refused:
        quantize_model(model, asked)
    assert ("already quantized as lsq W4A4 and cannot be re-quantized as lsq W4A4 (last_layer_bits: applied 8, "
            "asked null; act_signed: applied false, asked true; exclude: applied [], asked [fc]; ") in str(
                refused.value)


def test_swap_keeps_parameters_and_does_not_touch_the_global_rng():
    model = build_model("resnet20", 10)
    weight = model.layer1[0].conv1.weight
    state = torch.get_rng_state()
    quantize_model(model, QuantSpec(method="lsq", weight_bits=4))
    assert torch.equal(state, torch.get_rng_state())
    assert model.layer1[0].conv1.weight is weight


@pytest.mark.parametrize("method", ["lsq", "pact_dorefa", "dorefa"])
def test_state_dict_round_trip_restores_a_trained_quantized_model(method):
    torch.manual_seed(0)
    spec = QuantSpec(method=method, weight_bits=4, per_channel=method == "lsq")
    trained = quantize_model(build_model("resnet20", 10), spec)
    optimizer = torch.optim.SGD(parameter_groups(trained, 1e-4), lr=0.05)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(trained(images), labels).backward()
        optimizer.step()
    state = trained.state_dict()

    fresh = quantize_model(build_model("resnet20", 10), spec)
    fresh.load_state_dict(state)  # strict: same keys, same shapes (per-channel steps included)
    trained.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(images), trained(images))
    for module in fresh.modules():
        if isinstance(module, LSQQuantizer):
            assert module.ready  # the host-side flag follows the loaded buffer


def test_parameter_groups_separate_quantizer_parameters():
    lsq = quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", quantizer_weight_decay=5e-5))
    groups = {g.get("name", "network"): g for g in parameter_groups(lsq, 1e-4)}
    assert groups["network"]["weight_decay"] == 1e-4
    assert groups["lsq_steps"]["weight_decay"] == 5e-5
    n_steps = sum(isinstance(m, LSQQuantizer) for m in lsq.modules())
    assert len(groups["lsq_steps"]["params"]) == n_steps
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(lsq.parameters()))

    pact = quantize_model(build_model("resnet20", 10), QuantSpec(method="pact_dorefa", pact_alpha_decay=2e-4))
    groups = {g.get("name", "network"): g for g in parameter_groups(pact, 1e-4)}
    alpha = groups["pact_alphas"]["params"][0]
    optimizer = torch.optim.SGD(parameter_groups(pact, 1e-4), lr=0.5)
    alpha.grad = torch.zeros_like(alpha)
    before = alpha.item()
    optimizer.step()  # only the L2 penalty acts: alpha <- alpha - lr * decay * alpha
    assert alpha.item() == pytest.approx(before * (1 - 0.5 * 2e-4))


def test_first_batch_on_a_non_relu_network_fails_clearly():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.Flatten(),
                        nn.Linear(4 * 28 * 28, 2))
    quantize_model(net, QuantSpec(method="lsq", weight_bits=4))
    with pytest.raises(QuantSpecError, match="2 receives negative inputs.*act_signed"):
        net.train()(torch.randn(2, 3, 32, 32))
    signed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.Flatten(),
                           nn.Linear(4 * 28 * 28, 2))
    quantize_model(signed, QuantSpec(method="lsq", weight_bits=4, act_signed=True))
    assert torch.isfinite(signed.train()(torch.randn(2, 3, 32, 32))).all()


def test_logged_quantizer_state_and_weight_noise():
    model = quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", weight_bits=4))
    state = quantizer_state(model)
    assert "layer1.0.conv1.weight_quantizer.step" in state
    noise = weight_quantization_noise(model)
    layer = model.layer1[0].conv1
    delta = layer.weight_quantizer(layer.weight) - layer.weight
    mean_square, predicted = noise["layer1.0.conv1"]
    # one statistic for every method: the mean square E[delta^2] (what the matched-noise control injects)
    assert mean_square == pytest.approx(delta.pow(2).mean().item(), rel=1e-5)
    assert predicted == pytest.approx(layer.weight_quantizer.step.item() ** 2 / 12)
    # 8-bit first layer: much smaller noise than the 4-bit body
    assert noise["conv1"][0] < noise["layer1.0.conv1"][0]
