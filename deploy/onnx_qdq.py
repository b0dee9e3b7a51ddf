"""Export a fake-quant network to ONNX with QuantizeLinear / DequantizeLinear nodes (QDQ).

Each quantized Conv2d / Linear becomes, in the graph,

    input  -> QuantizeLinear -> [Clip to the b-bit grid] -> DequantizeLinear -> Conv / Gemm
    weight =  DequantizeLinear(integer initializer, scale [, axis 0 per channel])

with the integers and scales of `deploy.grids`, so the graph computes the fake-quant levels themselves; layers
the spec keeps in float stay float, and so does everything between the layers (BatchNorm, ReLU, additions,
pooling), as in training. The network is first rewritten into a *deploy network* whose quantized layers
hold integer buffers and call the ops of `deploy.qdq_ops` (it runs in PyTorch too), and torch.onnx (dynamo)
translates it. Whether the result computes what the fake-quant network computes is checked where it
matters, in ONNX Runtime (`deploy.verify`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deploy.bn_fold import fold_batch_norms
from deploy.errors import ExportError
from deploy.grids import activation_grid, weight_grid, weight_integers
from deploy.output import write_file
from deploy.qdq_ops import OPSET, TRANSLATIONS
from quantizers import QuantConv2d, QuantLinear, quantized_layers

INPUT_NAME = "images"


@dataclass(frozen=True)
class LayerExport:
    """How one layer was exported: bits of its weights and input (None = float), and their storage."""

    name: str
    weight_bits: int | None
    act_bits: int | None
    per_channel: bool
    weight_storage: str | None

    def describe(self) -> str:
        weights = f"W{self.weight_bits}" if self.weight_bits else "Wfloat"
        return weights + (f"A{self.act_bits}" if self.act_bits else "")


@dataclass
class OnnxExport:
    path: Path
    size: int
    layers: list[LayerExport]
    outputs: list[str]
    folded: list[str] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)

    def folding_summary(self) -> str:
        """e.g. 'BatchNorm folded into 21 convolutions; not folded: bn1 (its input is not a Conv)'."""
        return (f"BatchNorm folded into {len(self.folded)} convolutions"
                + "".join(f"; not folded: {bn} ({why})" for bn, why in self.not_folded))

    def layer_summary(self) -> str:
        """e.g. '19 x W4A4, 1 x W8, 1 x W8A8' in network order of first appearance."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.describe()] = counts.get(layer.describe(), 0) + 1
        return ", ".join(f"{n} x {kind}" for kind, n in counts.items())


class _DeployLayer(nn.Module):
    """A quantized Conv2d / Linear with integer weights and a QDQ input, computing its fake-quant levels."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.weight_grid = weight_grid(layer, name)
        self.input_grid = activation_grid(layer, name)
        if self.weight_grid is not None:
            integers = weight_integers(layer, self.weight_grid, name)
            self.register_buffer("weight_integers", integers.to(self.weight_grid.storage))
            self.register_buffer("weight_scale", self.weight_grid.scale.float())
        else:
            self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        if self.input_grid is not None:
            self.register_buffer("input_scale", self.input_grid.scale.float())
            self.register_buffer("input_zero_point", torch.zeros((), dtype=self.input_grid.storage))

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.input_grid
        if grid is None:
            return x
        if grid.storage_is_full:
            return torch.ops.qreg.quantize_dequantize_full(x, self.input_scale, self.input_zero_point)
        return torch.ops.qreg.quantize_dequantize(x, self.input_scale, self.input_zero_point, grid.low, grid.high)

    def dequantized_weight(self) -> torch.Tensor:
        grid = self.weight_grid
        if grid is None:
            return self.weight
        return torch.ops.qreg.dequantize(self.weight_integers, self.weight_scale, grid.axis or 0)

    def summary(self, name: str) -> LayerExport:
        weights, inputs = self.weight_grid, self.input_grid
        return LayerExport(
            name, weights.bits if weights else None, inputs.bits if inputs else None,
            per_channel=bool(weights is not None and weights.scale.dim()),
            weight_storage=str(weights.storage).removeprefix("torch.") if weights else None,
        )


class DeployConv2d(_DeployLayer):
    def __init__(self, layer: nn.Conv2d, name: str) -> None:
        if layer.padding_mode != "zeros":
            raise ExportError(f"{name}: padding_mode {layer.padding_mode!r} is not exported (only zeros)")
        super().__init__(layer, name)
        self.stride, self.padding, self.dilation, self.groups = (
            layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantized_input(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class DeployLinear(_DeployLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.dequantized_weight(), self.bias)


def deploy_network(net: nn.Module) -> tuple[nn.Module, list[LayerExport]]:
    """A copy of `net` in eval mode whose quantized layers hold integer weights and QDQ inputs."""
    deployed = copy.deepcopy(net).eval()
    layers = []
    for name, layer in quantized_layers(deployed).items():
        cls = DeployConv2d if isinstance(layer, QuantConv2d) else DeployLinear
        assert isinstance(layer, QuantConv2d | QuantLinear)
        replacement = cls(layer, name)
        parent_name, _, child = name.rpartition(".")
        setattr(deployed.get_submodule(parent_name), child, replacement)
        layers.append(replacement.summary(name))
    return deployed, layers


def _output_names(net: nn.Module, count: int) -> list[str]:
    """The network's own names for its outputs (`output_names`, e.g. the detector's) or output / output_<i>."""
    names = getattr(net, "output_names", None)
    if isinstance(names, list | tuple) and len(names) == count and all(isinstance(n, str) for n in names):
        return list(names)
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def flat_outputs(outputs) -> list[torch.Tensor]:
    """The tensors of a network's output (a tensor, or nested tuples / lists / dicts of them), in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        return [t for item in outputs for t in flat_outputs(item)]
    return []


def onnx_bytes(deployed: nn.Module, example: torch.Tensor) -> tuple[bytes, list[str]]:
    """The deploy network as a serialized ONNX model (opset 21) with a dynamic batch dimension."""
    with torch.no_grad():
        outputs = flat_outputs(deployed(example))
    names = _output_names(deployed, len(outputs))
    # torch.export specialises a dimension of size 1; two images keep the batch dimension symbolic.
    example = example[:1].expand(2, *example.shape[1:]).contiguous() if example.shape[0] < 2 else example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            deployed, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME], output_names=names,
            dynamic_shapes=({0: torch.export.Dim("batch")},), custom_translation_table=TRANSLATIONS,
            verbose=False, external_data=False,
        )
    return program.model_proto.SerializeToString(), names


def strip_trace_metadata(model) -> None:
    """Drop the exporter's per-node Python stack traces: 40 % of a ResNet20 file, of no use to a runtime."""
    for items in (model.graph.node, model.graph.value_info, model.graph.initializer):
        for item in items:
            del item.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""


def export_onnx(net: nn.Module, example: torch.Tensor, path: str | Path, fold_bn: bool = False,
                check: Callable[[Path], None] | None = None) -> OnnxExport:
    """Write `net` (fake-quant or float) as an ONNX QDQ model; `example` is one input batch (N, C, H, W).

    `check` runs on the written file before it takes its name (see `deploy.output.write_file`).
    """
    model, report = qdq_model(net, example, fold_bn)
    return replace(report, path=Path(path), size=write_model(model, Path(path), check))


def qdq_model(net: nn.Module, example: torch.Tensor, fold_bn: bool):
    """The QDQ graph of `net` in memory, and its report (path and size filled in when it is written)."""
    import onnx

    deployed, layers = deploy_network(net)
    data, names = onnx_bytes(deployed, example)
    model = onnx.load_from_string(data)
    strip_trace_metadata(model)
    folded, not_folded = fold_batch_norms(model) if fold_bn else ([], [])
    return model, OnnxExport(Path(), 0, layers, names, folded, not_folded)


def write_model(model, path: Path, check: Callable[[Path], None] | None) -> int:
    """Check `model` against the ONNX spec, write it (`check` runs on the file before it takes its name);
    returns its size in bytes."""
    import onnx

    onnx.checker.check_model(model)
    data = model.SerializeToString()
    write_file(path, data, check)
    return len(data)
