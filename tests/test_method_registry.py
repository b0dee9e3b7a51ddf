"""A quantization method added through the registry alone (one `register` call and its quantizer class) is
accepted by the spec, swapped in, trained, measured, logged, named in a study grid and labelled in reports."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import run_cli
from quantizers import (
    REGISTRY,
    Method,
    QuantSpec,
    method_colour,
    method_label,
    precision_label,
    quantize_model,
    register,
    weight_noise_statistics,
)
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
