"""A quantization method added through the registry alone (one `register` call and its quantizer class) is
accepted by the spec, swapped in, trained, measured, logged, named in a study grid and labelled in reports; one
whose quantizer learns a scale set on the first training batch also trains it in its own optimizer group, is
checkpointed, copied by the detector's EMA and exported (ONNX QDQ, packed integers) exactly, with no code outside
the test naming its class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from deploy.grids import weight_grid, weight_integers
from deploy.onnx_qdq import deploy_network, export_onnx
from deploy.packed import _read, load_packed_network, round_trip_identical, save_packed
from deploy.verify import compare
from lightning_modules import ClassificationModule
from lightning_modules.yolo.ema import ModelEMA
from quantizers import (
    REGISTRY,
    DataInitializedQuantizer,
    IntegerGrid,
    LearnedParameter,
    Method,
    NoIntegerGrid,
    QuantSpec,
    method_colour,
    method_label,
    parameter_groups,
    precision_label,
    quantize_model,
    quantized_layers,
    quantizer_state,
    quantizers_in,
    register,
    unready_quantizers,
    weight_noise_statistics,
    weight_quantization_noise,
)
from quantizers.compiling import quantizers_ready
from quantizers.straight_through import RoundSTE
from records.run_files import read_epoch_metrics
from records.store import read_rows
from study.grid import MethodEntry, StudyConfig


class PowerOfTwoGrid(nn.Module):
    """Toy weight quantizer: rounds to multiples of 2^-bits (straight-through), no learned state."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = 2.0 ** self.bits
        return RoundSTE.apply(weight * scale) / scale


@pytest.fixture
def toy_method():
    toy = register(Method(
        "toy", "Toy grid", "tab:pink",
        weight=lambda weight, bits, spec, is_last: PowerOfTwoGrid(bits),
        weight_class=PowerOfTwoGrid,
        noise=lambda weight, quantizer: (quantizer(weight) - weight, torch.tensor(2.0 ** (-2 * quantizer.bits))),
    ))
    yield toy
    del REGISTRY["toy"]


def test_a_registered_method_is_a_method_everywhere(toy_method):
    spec = QuantSpec(method="toy", weight_bits=4)
    assert spec.quantized and not spec.quantizes_activations and spec.describe() == "toy W4"
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                                         nn.Linear(8 * 28 * 28, 2)), spec)
    assert isinstance(model[2].weight_quantizer, PowerOfTwoGrid) and model[2].input_quantizer is None
    weight = torch.rand(10_000) - 0.5
    mean_square, predicted = weight_noise_statistics(weight, model[2].weight_quantizer)
    assert mean_square / predicted == pytest.approx(1.0, abs=0.05)  # uniform rounding noise: Delta^2 / 12
    cells = StudyConfig(name="s", base=["x.yaml"], methods=[MethodEntry("fp32"), MethodEntry("toy", [4])]).cells()
    assert [c.name for c in cells] == ["fp32-seed0", "toy-w4-seed0"]
    assert (method_label("toy"), method_colour("toy"), precision_label("toy", 4, 32)) == ("Toy grid", "tab:pink", "W4")


def test_a_registered_method_trains_two_steps_and_is_tested(toy_method, digits_fast_args, tmp_path):
    code = run_cli("fit", *digits_fast_args, "--quantization.method", "toy", "--quantization.weight_bits", "4",
                   "--trainer.max_steps", "2")
    assert code == 0
    run = tmp_path / "run"
    rows = read_rows(run / "results.jsonl")
    clean = next(r for r in rows if r["corruption"] == "clean" and r["metric"] == "accuracy")
    assert (clean["method"], clean["weight_bits"], clean["act_bits"], clean["step"]) == ("toy", 4, 32, 2)
    epoch = read_epoch_metrics(run / "metrics.jsonl")[-1]
    assert epoch["step"] == 2 and epoch["quant_noise/layer1.0.conv1"] > 0  # the toy's noise model, logged
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["quantization"]["method"] == "toy"


# ---------------------------------------------------------------- a method with a learned, data-initialised scale


class SymmetricMaxScale(DataInitializedQuantizer):
    """Toy learned-scale quantizer, unlike LSQ in its grid and its start: the symmetric grid
    [-(2^(b-1)-1), 2^(b-1)-1] (no -2^(b-1)), the scale starting at max|x| / (2^(b-1)-1), set from the weight when
    built or from the first training batch (passing inputs through until then), then learned."""

    learned_parameters = (LearnedParameter("scale", "max_scales", "quantizer_weight_decay", "quantizer_lr_scale"),)

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.q_max = 2 ** (bits - 1) - 1
        self.scale = nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def initialize_from(self, values: torch.Tensor) -> None:
        self.scale.copy_(values.abs().max().clamp_min(1e-8) / self.q_max)
        self.mark_ready()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            if not self.training:
                return x
            self.initialize_from(x)
        v = (x / self.scale).clamp(-self.q_max, self.q_max)
        return (v + (v.round() - v).detach()) * self.scale  # exactly round(v) * scale; the scale gets a gradient

    def integer_grid(self, weight: torch.Tensor | None = None) -> IntegerGrid:
        if not self.ready:
            raise NoIntegerGrid("its scale was never initialised")
        return IntegerGrid(self.bits, self.scale.detach().float().clone(), -self.q_max, self.q_max)


def _max_scale_weight(weight, bits, spec, is_last):
    quantizer = SymmetricMaxScale(bits).to(weight.device)
    quantizer.initialize_from(weight.detach())
    return quantizer


@pytest.fixture
def max_scale_method():
    method = register(Method(
        "maxscale", "Max scale", "tab:olive",
        weight=_max_scale_weight,
        weight_class=SymmetricMaxScale,
        noise=lambda weight, quantizer: (quantizer(weight) - weight, quantizer.scale.detach().pow(2)),
        input=lambda bits, spec: SymmetricMaxScale(bits),
    ))
    yield method
    del REGISTRY["maxscale"]


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def test_a_method_with_a_learned_data_initialised_scale_trains_checkpoints_averages_and_exports(
        max_scale_method, tmp_path):
    spec = QuantSpec(method="maxscale", weight_bits=4, quantizer_lr_scale=0.5)
    net = quantize_model(_small_net(), spec)
    quantizers = dict(quantizers_in(net))
    assert all(isinstance(q, SymmetricMaxScale) for q in quantizers.values()) and len(quantizers) == 7
    # readiness: the weights' scales are set at build time, the inputs' on the first training batch
    assert unready_quantizers(net) == ["3.input_quantizer", "6.input_quantizer", "10.input_quantizer"]
    assert not quantizers_ready(net)  # so `compile: true` waits for that batch
    ema = ModelEMA(ModelEMA.copy_of(net), decay=0.5, tau=1.0)

    # its learned parameter in its own optimizer group, at lr * quantizer_lr_scale
    groups = {g.get("name", "network"): g for g in parameter_groups(net, 1e-4, lr=0.1)}
    assert set(groups) == {"network", "max_scales"}
    scales = groups["max_scales"]
    assert {id(p) for p in scales["params"]} == {id(q.scale) for q in quantizers.values()}
    assert scales["lr"] == pytest.approx(0.05) and scales["weight_decay"] == 0.0
    optimizer = torch.optim.SGD(list(groups.values()), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 3, 12, 12, generator=generator), torch.randint(0, 4, (64,), generator=generator)
    net.train()
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        before = {name: (q.scale.item(), q.scale.grad.item()) for name, q in quantizers.items()}
        optimizer.step()
        for name, q in quantizers.items():
            value, grad = before[name]
            assert q.scale.item() == pytest.approx(value - 0.05 * grad, rel=1e-6, abs=1e-9), (step, name)
        if step == 0:
            assert unready_quantizers(net) == [] and quantizers_ready(net)
        ema.update(net)
    assert any(before[name][1] != 0 for name in quantizers)  # the scales did learn

    # the EMA copy, made before the first batch, is initialised with its live twin and quantizes
    assert unready_quantizers(ema.ema) == []
    activations = torch.rand(2, 8, 12, 12)
    assert not torch.equal(ema.ema.get_submodule("3.input_quantizer")(activations), activations)

    # logged and measured like any method
    assert set(quantizer_state(net)) == {f"{name}.scale" for name in quantizers}
    noise = weight_quantization_noise(net)
    assert set(noise) == {"0", "3", "6", "10"} and all(mean_square > 0 for mean_square, _ in noise.values())

    # a checkpoint restores it, readiness included (state_dict names: <layer>.<role>.scale / .initialized)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    restored = quantize_model(_small_net(), spec)
    restored.load_state_dict(torch.load(tmp_path / "net.pt"))
    assert unready_quantizers(restored) == []
    net.eval()
    restored.eval()
    assert torch.equal(restored(images), net(images))

    # exported through the quantizer's own grid: the deploy network computes the fake-quant outputs bit for bit
    for name, layer in quantized_layers(net).items():
        grid = weight_grid(layer, name)
        levels = weight_integers(layer, grid, name).float() * grid.broadcast_scale(layer.weight.dim())
        with torch.no_grad():
            assert torch.equal(levels, layer.weight_quantizer(layer.weight)), name
    deployed, layers = deploy_network(net)
    with torch.no_grad():
        assert torch.equal(deployed(images), net(images))
    assert [layer.describe() for layer in layers] == ["W8", "W4A4", "W4A4", "W8A8"]
    report = export_onnx(net, images[:2], tmp_path / "model.onnx")
    result = compare(report.path, net, images)
    # ONNX Runtime sums in another order, so an input within a rounding of a level boundary may flip a level
    assert result.max_difference <= 0.05 * result.output_range and result.top1_agreement >= 0.95
    packed = save_packed(net, tmp_path / "model.safetensors")
    assert {layer.bits for layer in packed.layers} == {4, 8}
    rebuilt = load_packed_network(_small_net(), *_read(packed.path))
    assert round_trip_identical(net, rebuilt, images) == (64, 64)


def test_a_method_with_a_learned_scale_trains_through_the_cli(max_scale_method, digits_fast_args, tmp_path):
    code = run_cli("fit", *digits_fast_args, "--quantization.method", "maxscale", "--quantization.weight_bits", "4",
                   "--trainer.max_steps", "2", "--test_after_fit", "false")
    assert code == 0
    epoch = read_epoch_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert epoch["quant/layer1.0.conv1.input_quantizer.scale"] > 0  # logged through its learned_parameters
    module = ClassificationModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(module.net.layer1[0].conv1.input_quantizer, SymmetricMaxScale)
    assert unready_quantizers(module.net) == []
