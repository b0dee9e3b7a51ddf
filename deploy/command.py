"""`cli.py export`: a trained checkpoint to ONNX (exact QDQ, or `onnx-int8` whose quantized convolutions run as
integer QLinearConv) or packed integer weights, checked in ONNX Runtime.

    python cli.py export --config configs/digits_resnet20_lsq4.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt \\
        --format onnx --out model.onnx

The checkpoint's quantization spec says how the model was quantized (as for `test`); the config gives the
task module's class and the data whose test images the export is checked on.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deploy.errors import ExportError, ExportStopped, VerificationFailed
from deploy.grids import activation_grid
from quantizers import CHECKPOINT_KEY, QuantSpec, quantized_layers
from records.exits import EXIT_SIGINT, EXIT_SIGTERM

FORMATS = ("onnx", "onnx-int8", "int")
# Sections of a fit config that export reads past: they configure training, not the model.
_IGNORED_SECTIONS = ("trainer", "seed_everything", "flatness", "results", "test_after_fit", "optimizer",
                     "lr_scheduler", "weights_only")


def add_export_arguments(parser) -> None:
    from jsonargparse import ActionConfigFile
    from lightning import LightningDataModule, LightningModule

    from callbacks import QuantizationCallback

    parser.add_argument("--config", action=ActionConfigFile, help="the run's config (e.g. its config.yaml)")
    parser.add_subclass_arguments(LightningModule, "model", required=False,
                                  help="the task module (its class loads the checkpoint; default: the checkpoint's)")
    parser.add_subclass_arguments(LightningDataModule, "data", required=False,
                                  help="the data whose test images the export is checked on")
    parser.add_class_arguments(QuantizationCallback, "quantization", help="must match the checkpoint's, if set")
    for section in _IGNORED_SECTIONS:
        parser.add_argument(f"--{section}", type=Any, default=None, help="read past (training only)")
    parser.add_argument("--ckpt_path", required=True, help="the trained checkpoint")
    parser.add_argument("--format", type=Literal[FORMATS], default="onnx",
                        help="onnx: QDQ graph (plain float for an FP32 model); onnx-int8: quantized convolutions as "
                             "QLinearConv (ONNX Runtime's integer kernels; BatchNorm folded); int: packed integer "
                             "weights")
    parser.add_argument("--out", required=True, help="the file to write (.onnx, or .safetensors for int)")
    parser.add_argument("--fold_bn", type=bool, default=False,
                        help="onnx: fold BatchNorm into the convolutions' scales where the levels stay exact")
    parser.add_argument("--new_points", type=bool, default=True,
                        help="onnx-int8: also run the convolutions whose output enters float arithmetic (residual "
                             "additions, pooling) as QLinearConv, and the residual additions as QLinearAdd, at new "
                             "8-bit rounding points calibrated on training images; false keeps them "
                             "DequantizeLinear + float Conv / Add")
    parser.add_argument("--calibration_images", type=int, default=1000,
                        help="onnx-int8: training images that set the scales of the new 8-bit points (at most)")
    parser.add_argument("--verify", type=bool, default=True,
                        help="check the written model against the PyTorch model on test images")
    parser.add_argument("--verify_images", type=int, default=1000, help="test images the check uses (at most)")
    parser.add_argument("--min_agreement", type=float, default=0.995,
                        help="onnx, onnx-int8: smallest top-1 agreement with PyTorch the check accepts (classifiers)")
    parser.add_argument("--max_difference", type=float, default=0.05,
                        help="onnx, onnx-int8: largest difference the check accepts, as a fraction of each output's "
                             "range, where neither top-1 agreement (classifiers) nor detections found again "
                             "(detectors that detect something on the check images) can be compared")
    parser.add_argument("--min_detections", type=float, default=0.95,
                        help="onnx, onnx-int8: smallest share of PyTorch's detections after NMS (score >= 0.25) "
                             "that the exported detector must find again (same class, IoU >= 0.9)")


def read(ckpt_path: Path) -> dict[str, Any]:
    """The checkpoint, checked as every checkpoint qreg reads is (`CheckpointError` names the file)."""
    from callbacks.checkpoint_io import read_checkpoint

    return read_checkpoint(ckpt_path, required=("state_dict",))


def checkpoint_spec(ckpt_path: Path, checkpoint: dict[str, Any] | None = None) -> QuantSpec | None:
    """The quantization spec a checkpoint carries, or None when it has none."""
    spec = (read(ckpt_path) if checkpoint is None else checkpoint).get(CHECKPOINT_KEY)
    return None if spec is None else QuantSpec.from_dict(spec)


def model_class_for(configured: Any, checkpoint: dict[str, Any], ckpt_path: Path) -> type:
    """The task module class that loads the checkpoint: the config's, which must be the task the checkpoint
    was trained for (Lightning would refuse another with a long ValueError), else the one the checkpoint names
    (a fit through cli.py stores it among the hyperparameters)."""
    from callbacks.checkpoint_io import check_checkpoint_task
    from deploy.packed import task_class

    named = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    stored = None
    if named:
        try:
            stored = task_class(named)
        except ExportError:
            raise ExportError(f"{ckpt_path} was trained with model class {named!r}, not a qreg task module") from None
    if configured is None:
        if stored is None:
            raise ExportError(f"{ckpt_path} does not name its model class: give the run's config (--config "
                              "runs/<run>/config.yaml) or --model")
        return stored
    wanted = task_class(configured.class_path)
    check_checkpoint_task(ckpt_path, stored, wanted, "export")
    return wanted


def resolve_spec(ckpt_path: Path, stored: QuantSpec | None, configured: QuantSpec, export_format: str) -> QuantSpec:
    """The spec to export with: the checkpoint's, checked against the format and the config."""
    if stored is None:
        if export_format != "onnx" or configured.quantized:
            asked = f"--format {export_format}" if export_format != "onnx" else f"the config's {configured.describe()}"
            raise ExportError(f"{ckpt_path} holds no quantization spec (it was not saved by a qreg fit), so it cannot "
                              f"be exported as quantized ({asked}); export a checkpoint of a quantized run")
        return QuantSpec()
    if configured.quantized and configured != stored:
        raise ExportError(f"the checkpoint was trained as {stored.describe()} but the config asks for "
                          f"{configured.describe()} ({stored.describe_differences(configured)}); drop the config's "
                          "quantization section or fix it")
    if export_format == "int" and not stored.quantized:
        raise ExportError(f"{ckpt_path} is an FP32 model ({stored.method}): --format int packs quantized weights; "
                          "use --format onnx for a float model")
    if export_format == "onnx-int8" and not stored.quantized:
        raise ExportError(f"{ckpt_path} is an FP32 model ({stored.method}): --format onnx-int8 runs quantized layers "
                          "in integer kernels; use --format onnx for a float model")
    return stored


def load_module(model_class: type, ckpt_path: Path):
    try:
        return model_class.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"{ckpt_path} does not fit {model_class.__name__}: {first}") from None


def network(module) -> nn.Module:
    """The network a task module evaluates with (its `eval_net`, e.g. an EMA copy, or `net`)."""
    net = getattr(module, "eval_net", None) if hasattr(type(module), "eval_net") else None
    net = net if isinstance(net, nn.Module) else getattr(module, "net", None)
    if not isinstance(net, nn.Module):
        raise ExportError(f"{type(module).__name__} has no `net` network to export")
    return net


def _images_of(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("images", "img", "image"):
            if key in batch:
                return batch[key]
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ExportError(f"cannot find the images in a test batch of type {type(batch).__name__}")


def _network_images(datamodule, loader, count: int) -> torch.Tensor:
    """Up to `count` images of `loader` as the network receives them (after the DataModule's preprocessing);
    images still in uint8 (the detection DataModules) are scaled to [0, 1] as the detection module does."""
    chunks, total = [], 0
    for batch in loader:
        images = _images_of(datamodule.on_after_batch_transfer(batch, 0))
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        chunks.append(images)
        total += len(images)
        if total >= count:
            break
    return torch.cat(chunks)[:count]


def test_images(datamodule, count: int) -> torch.Tensor:
    """Up to `count` clean test images as the network receives them.

    Through the predict stage, which serves the clean test set alone: the test stage would also build, or load
    and check, all 95 corrupted splits."""
    datamodule.setup("predict")
    return _network_images(datamodule, datamodule.predict_dataloader(), count)


def training_images(datamodule, count: int) -> torch.Tensor:
    """Up to `count` training images (the onnx-int8 calibration), in the training loader's order; no trainer is
    attached, so the classification DataModules leave them unaugmented."""
    datamodule.setup("fit")
    return _network_images(datamodule, datamodule.train_dataloader(), count)


def last_layer_step(net: nn.Module) -> float | None:
    """One input level of the last quantized layer through its largest weight: a logit's quantization step."""
    layers = list(quantized_layers(net).items())
    if not layers:
        return None
    name, layer = layers[-1]
    grid = activation_grid(layer, name)
    if grid is None:
        return None
    with torch.no_grad():
        weight = layer.weight if layer.weight_quantizer is None else layer.weight_quantizer(layer.weight)
    return float(grid.scale) * weight.abs().max().item()


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _onnx_check(config, net: nn.Module, images: torch.Tensor, out: Path, agreement: dict[str, Any]):
    """The check a written ONNX file must pass before it takes its name; its result lands in `agreement`."""
    from deploy.verify import compare

    def check(path: Path) -> None:
        if not config.verify:
            return
        result = compare(path, net, images)
        agreement["result"] = result
        if result.top1_agreement is not None and result.top1_agreement < config.min_agreement:
            raise VerificationFailed(f"ONNX Runtime agrees with PyTorch on only {result.describe()} "
                                     f"(< {100 * config.min_agreement:.1f} %); {out} was not written")
        # What the network is for decides: a classifier's top-1, a detector's detections after NMS; only where
        # neither is there to compare (no (N, classes) output, or a detector that detects nothing yet) the
        # largest difference of every output.
        found = result.detections.found_share if result.detections is not None else None
        if (result.top1_agreement is None and found is None
                and result.worst_relative_difference > config.max_difference):
            raise VerificationFailed(f"ONNX Runtime differs from PyTorch by more than {config.max_difference:g} "
                                     f"of an output's range: {result.describe()}; {out} was not written")
        if found is not None and found < config.min_detections:
            raise VerificationFailed(f"ONNX Runtime finds only {100 * found:.1f} % of PyTorch's detections again "
                                     f"(< {100 * config.min_detections:.1f} %): {result.describe()}; {out} was not "
                                     "written")

    return check


def _export_qdq(config, net: nn.Module, images: torch.Tensor, out: Path, check) -> None:
    from deploy.onnx_qdq import export_onnx

    report = export_onnx(net, images[:2], out, fold_bn=config.fold_bn, check=check)
    quantized = sum(1 for layer in report.layers if layer.weight_bits or layer.act_bits)
    print(f"wrote {out} ({_size(report.size)}): " + (
        f"{quantized} quantized layers as QDQ ({report.layer_summary()})" if quantized else "float model"))
    if config.fold_bn:
        print(report.folding_summary())


def _export_int8(config, net: nn.Module, images: torch.Tensor, datamodule, out: Path, check) -> None:
    from deploy.onnx_int8 import export_onnx_int8

    calibration = training_images(datamodule, config.calibration_images) if config.new_points else images[:2]
    report = export_onnx_int8(net, images[:2], calibration, out, new_points=config.new_points, check=check)
    print(f"wrote {out} ({_size(report.size)}): {report.route_summary()}; {report.folding_summary()}")
    print("per layer:")
    for route in report.routes:
        print(f"  {route.describe()}")
    print(f"layout: {report.channels_last_ops} integer ops written channels-last (NHWC), Transposes only where "
          "8-bit tensors enter or leave them")
    from deploy.verify import runtime_kernels

    with tempfile.TemporaryDirectory(prefix="qreg-kernels-") as scratch:
        kernels = runtime_kernels(out, Path(scratch))
    print("ONNX Runtime runs: " + ", ".join(f"{kind} {count}" for kind, count in kernels.items()))


def run_export(config) -> None:
    from deploy.packed import load_packed, round_trip_identical, save_packed

    ckpt_path, out = Path(config.ckpt_path), Path(config.out)
    from deploy.output import check_writable

    check_writable(out)
    if config.verify_images < 1:
        raise ExportError(f"--verify_images must be >= 1, got {config.verify_images}")
    for option in ("min_agreement", "min_detections"):
        if not 0 <= getattr(config, option) <= 1:
            raise ExportError(f"--{option} is a share of the check images / detections, in [0, 1]; got "
                              f"{getattr(config, option)}")
    if config.format == "onnx-int8" and config.calibration_images < 1:
        raise ExportError(f"--calibration_images must be >= 1, got {config.calibration_images}")
    from callbacks import QuantizationCallback

    fields = {k: v for k, v in config.quantization.as_dict().items() if not k.startswith("__")}
    configured = QuantizationCallback(**fields).spec
    checkpoint = read(ckpt_path)
    model_class = model_class_for(config.model, checkpoint, ckpt_path)
    spec = resolve_spec(ckpt_path, checkpoint_spec(ckpt_path, checkpoint), configured, config.format)
    del checkpoint
    needs_images = config.format != "int" or config.verify
    if needs_images and config.data is None:
        raise ExportError("no data section: export needs test images (for the graph's input shape and the check); "
                          "give the run's config (--config runs/<run>/config.yaml)"
                          + (" or --verify false" if config.format == "int" else ""))
    module = load_module(model_class, ckpt_path)
    net = network(module)
    images = datamodule = None
    if needs_images:
        from jsonargparse import ArgumentParser
        from lightning import LightningDataModule

        parser = ArgumentParser()
        parser.add_subclass_arguments(LightningDataModule, "data")
        datamodule = parser.instantiate_classes(parser.parse_object({"data": config.data.as_dict()})).data
        images = test_images(datamodule, config.verify_images)
    print(f"exporting {ckpt_path} ({spec.describe()}, {type(module).__name__}) as {config.format} to {out}")
    if config.format in ("onnx", "onnx-int8"):
        agreement: dict[str, Any] = {}
        check = _onnx_check(config, net, images, out, agreement)
        if config.format == "onnx":
            _export_qdq(config, net, images, out, check)
        else:
            _export_int8(config, net, images, datamodule, out, check)
        if "result" in agreement:
            result = agreement["result"]
            step = last_layer_step(net)
            in_steps = f" = {result.max_difference / step:.2f} last-layer steps of {step:.3g}" if step else ""
            print(f"ONNX Runtime (CPU) vs PyTorch {result.describe()}{in_steps}")
        return

    checked: dict[str, tuple[int, int]] = {}

    def check_packed(path: Path) -> None:
        if not config.verify:
            return
        rebuilt = network(load_packed(path))
        same, total = round_trip_identical(net, rebuilt, images)
        checked["result"] = (same, total)
        if same != total:
            raise VerificationFailed(f"the model rebuilt from the packed weights differs from the checkpoint's on "
                                     f"{total - same} of {total} images; {out} was not written")

    report = save_packed(net, out, module_class=model_class, hparams=dict(module.hparams), check=check_packed)
    float_bytes = sum(p.numel() * 4 for p in net.state_dict().values() if p.is_floating_point())
    print(f"wrote {out} ({_size(report.size)}); checkpoint {_size(ckpt_path.stat().st_size)}, "
          f"network state in FP32 {_size(float_bytes)}")
    for bits, (count, size) in report.by_bits().items():
        print(f"  {bits}-bit weights: {count:,} -> {_size(size)} packed ({_size(4 * count)} in FP32)")
    print(f"  float32 values kept (BatchNorm, biases, quantizer state, float layers): {report.float_values:,}")
    if "result" in checked:
        same, total = checked["result"]
        print(f"rebuilt from the packed file: outputs bitwise identical to the checkpoint's on {same}/{total} images")


@contextlib.contextmanager
def stopped_by_sigterm():
    """SIGTERM raises `ExportStopped` where the export is, so that the file being written is removed on the way
    out (`write_atomically` removes its temporary file on any exception); a second one is ignored while that
    clean-up runs. Yields the list of signals received: an extension module being imported when the signal came
    turns the exception into an ImportError, which is a stop all the same. Outside the main thread (where no
    handler can be set) the default action stays."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(_number, _frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append("SIGTERM")
        raise ExportStopped

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(error: BaseException | None) -> bool:
    """Whether a Ctrl-C (KeyboardInterrupt) is in the exception's chain, however a library wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt | ExportStopped):
            return True
        error = error.__cause__ or error.__context__
    return False


def main(args: list[str], parser) -> None:
    add_export_arguments(parser)
    config = parser.parse_args(args)
    received: list[str] = []
    try:
        with stopped_by_sigterm() as received:
            run_export(config)
    except VerificationFailed as failure:
        print(f"qreg: export check failed: {failure}", file=sys.stderr)
        raise SystemExit(1) from None
    except BaseException as error:
        if not (received or _interrupted(error)):
            raise
        name, status = ("SIGTERM", EXIT_SIGTERM) if received else ("Ctrl-C (SIGINT)", EXIT_SIGINT)
        print(f"qreg: export stopped by {name}; nothing was written to {config.out}", file=sys.stderr)
        raise SystemExit(status) from None
