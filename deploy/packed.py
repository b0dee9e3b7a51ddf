"""Packed integer weights: a safetensors file that holds a quantized model in its trained bits.

What the file holds:
- for each quantized layer's weights, the integer of every weight as an unsigned b-bit code (signed grids
  offset by their lowest integer, DoReFa's odd integers halved; see `IntegerGrid.codes`), row-major,
  concatenated most significant bit first into bytes (numpy.packbits order): four 2-bit or two 4-bit
  weights per byte, `<layer>.weight.codes`; and the float facts its quantizer needs to rebuild the weights
  (`Quantizer.packing_facts`), `<layer>.weight.<fact>`: nothing more for LSQ (its step is in the state),
  `<layer>.weight.max_abs` for DoReFa;
- every other tensor of the network's state as it was (BatchNorm, biases, LSQ steps, PACT alphas, float layers);
- metadata: the quantization spec, each packed layer's bits, shape and grid, and the task module's class and
  hyperparameters, so `load_packed` rebuilds the network without the config or checkpoint.

`load_packed` rebuilds the fake-quant network with float weights chosen by each quantizer so that it puts them
on the very same levels (`Quantizer.weight_from_integers`): `integer * step` for LSQ (the step divides it back
to the integer exactly), and for DoReFa `sign * max|w|` where the level is extreme, `atanh(level *
tanh(max|w|))` elsewhere, which keeps max|w| (and so the last layer's rescale) bit for bit. The rebuilt
network's outputs are bitwise those of the original, which `round_trip_identical` checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy.errors import ExportError
from deploy.grids import weight_grid, weight_integers
from deploy.output import write_file
from quantizers import IntegerGrid, NoIntegerGrid, Quantizer, QuantSpec, applied_spec, quantize_model, quantized_layers

FORMAT = "qreg-packed-1"
CODES = "codes"  # `<layer>.weight.codes`; any other `<layer>.weight.<name>` of a packed layer is a packing fact


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned b-bit codes (uint8, each < 2^b) as a byte string of b bits each, MSB first."""
    bit_planes = np.unpackbits(codes.reshape(-1, 1).astype(np.uint8), axis=1)[:, 8 - bits :]
    return np.packbits(bit_planes.reshape(-1))


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    bit_planes = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits :] = bit_planes
    return np.packbits(full, axis=1).reshape(count)


@dataclass(frozen=True)
class PackedLayer:
    name: str
    bits: int
    count: int
    packed_bytes: int


@dataclass(frozen=True)
class PackedExport:
    path: Path
    size: int
    layers: list[PackedLayer]
    float_values: int  # values kept in float32: BatchNorm, biases, quantizer state, float layers

    def by_bits(self) -> dict[int, tuple[int, int]]:
        """bits -> (weights, bytes they take packed)."""
        totals: dict[int, tuple[int, int]] = {}
        for layer in self.layers:
            count, size = totals.get(layer.bits, (0, 0))
            totals[layer.bits] = (count + layer.count, size + layer.packed_bytes)
        return dict(sorted(totals.items()))


def _jsonable(hparams) -> dict:
    return json.loads(json.dumps(dict(hparams), default=lambda value: list(value) if isinstance(value, tuple)
                                 else str(value)))


def save_packed(net: nn.Module, path: str | Path, module_class: type | None = None,
                hparams: dict | None = None, check: Callable[[Path], None] | None = None) -> PackedExport:
    """Write `net`'s quantized weights packed in their bits, and the rest of its state, to a safetensors file.

    `module_class` / `hparams` (the task module the network belongs to) let `load_packed` rebuild it alone.
    """
    from safetensors.numpy import save

    spec = applied_spec(net)
    if not spec.quantized:
        raise ExportError("the model is not quantized: --format int packs quantized weights; "
                          "use --format onnx for a float model")
    tensors: dict[str, np.ndarray] = {}
    layers_meta: dict[str, dict] = {}
    packed_layers = []
    packed_weights = set()
    for name, layer in quantized_layers(net).items():
        grid = weight_grid(layer, name)
        if grid is None:
            continue
        codes = grid.codes(weight_integers(layer, grid, name)).numpy()
        packed = pack_codes(codes, grid.bits)
        tensors[f"{name}.weight.{CODES}"] = packed
        for fact, value in layer.weight_quantizer.packing_facts(layer.weight.detach()).items():
            tensors[f"{name}.weight.{fact}"] = value.detach().cpu().numpy().copy()
        layers_meta[name] = {"bits": grid.bits, "shape": list(layer.weight.shape), "low": grid.low,
                             "stride": grid.stride, "quantizer": type(layer.weight_quantizer).__name__}
        packed_layers.append(PackedLayer(name, grid.bits, codes.size, packed.size))
        packed_weights.add(f"{name}.weight")
    if not packed_layers:
        raise ExportError(f"the model ({spec.describe()}) keeps every weight in float at inference: "
                          "nothing to pack; use --format onnx")
    float_values = 0
    for key, value in net.state_dict().items():
        if key not in packed_weights:
            tensors[key] = value.detach().cpu().numpy().copy()
            float_values += value.numel() if value.is_floating_point() else 0
    metadata = {
        "format": FORMAT,
        "spec": json.dumps(spec.to_dict()),
        "layers": json.dumps(layers_meta),
        "module_class": f"{module_class.__module__}.{module_class.__qualname__}" if module_class else "",
        "hparams": json.dumps(_jsonable(hparams or {})),
    }
    data = save(tensors, metadata=metadata)
    write_file(Path(path), data, check)
    return PackedExport(Path(path), len(data), packed_layers, float_values)


def _packed_entries_of(name: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed layer's own entries, `<layer>.weight.<entry>`, by entry: its codes and its packing facts."""
    prefix = f"{name}.weight."
    return {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}


def _rebuilt_weight(layer: nn.Module, meta: dict, entries: dict[str, np.ndarray], name: str) -> torch.Tensor:
    codes = unpack_codes(entries[CODES], meta["bits"], int(np.prod(meta["shape"])))
    integers = IntegerGrid.integers(torch.from_numpy(codes), meta["low"], meta["stride"]).view(meta["shape"])
    quantizer = layer.weight_quantizer
    if not isinstance(quantizer, Quantizer):
        raise ExportError(f"{name}: cannot rebuild weights for quantizer {type(quantizer).__name__}")
    facts = {fact: torch.from_numpy(value) for fact, value in entries.items() if fact != CODES}
    try:
        return quantizer.weight_from_integers(integers, facts)
    except NoIntegerGrid as error:
        raise ExportError(f"{name}: cannot rebuild its weights: {error}") from None


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ExportError(f"cannot read {path} as a packed model: {error}") from None
    if metadata.get("format") != FORMAT:
        raise ExportError(f"{path} is not a qreg packed model (format {metadata.get('format')!r})")
    return tensors, metadata


def task_class(class_path: str) -> type:
    """The task module class a config or a packed file names; only qreg's task modules are built (a packed file
    is data, and must not be able to name any callable to run)."""
    from callbacks.checkpoint_io import task_module_class

    found = task_module_class(class_path)
    if found is None:
        raise ExportError(f"unknown model class {class_path!r}: expected a qreg task module, e.g. "
                          "lightning_modules.ClassificationModule")
    return found


def load_packed(path: str | Path):
    """Rebuild the task module (e.g. ClassificationModule) of a packed file, its `net` the fake-quant network."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such packed model: {path}")
    tensors, metadata = _read(path)
    module = task_class(metadata.get("module_class", ""))(**json.loads(metadata["hparams"]))
    module.net = load_packed_network(module.net, tensors, metadata)
    return module.eval()


@torch.no_grad()
def load_packed_network(net: nn.Module, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> nn.Module:
    """Quantize a freshly built float `net` as the file says and load its state and rebuilt weights."""
    spec = QuantSpec.from_dict(json.loads(metadata["spec"]))
    quantize_model(net, spec)
    layers_meta = json.loads(metadata["layers"])
    entries = {name: _packed_entries_of(name, tensors) for name in layers_meta}
    packed_keys = {f"{name}.weight.{entry}" for name, own in entries.items() for entry in own}
    state = {key: torch.from_numpy(value.copy()) for key, value in tensors.items() if key not in packed_keys}
    # The quantizer state first: LSQ weights are rebuilt from their steps.
    net.load_state_dict({k: v for k, v in state.items() if "quantizer" in k}, strict=False)
    layers = quantized_layers(net)
    for name, meta in layers_meta.items():
        state[f"{name}.weight"] = _rebuilt_weight(layers[name], meta, entries[name], name)
    net.load_state_dict(state, strict=True)
    return net


@torch.no_grad()
def round_trip_identical(original: nn.Module, rebuilt: nn.Module, images: torch.Tensor,
                         batch_size: int = 256) -> tuple[int, int]:
    """(images whose outputs are bitwise identical, images) for two networks in eval mode."""
    from deploy.onnx_qdq import flat_outputs

    original_mode = original.training
    original.eval()
    rebuilt.eval()
    same = 0
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            a, b = flat_outputs(original(batch)), flat_outputs(rebuilt(batch))
            equal = torch.ones(len(batch), dtype=torch.bool)
            for x, y in zip(a, b, strict=True):
                equal &= (x == y).flatten(1).all(1) if x.dim() > 1 else x == y
            same += int(equal.sum())
    finally:
        original.train(original_mode)
    return same, len(images)
