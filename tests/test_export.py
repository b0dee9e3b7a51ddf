"""`deploy/`: ONNX QDQ export checked in ONNX Runtime, packed integer weights, and `cli.py export`.

The method matrix fine-tunes one short FP32 digits ResNet20 with each method for a few steps (plain PyTorch,
no Lightning: seconds), exports it, and runs it in ONNX Runtime on the 360 test digits.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from conftest import REPO, run_cli
from datamodules.digits import DigitsDataModule
from deploy.command import last_layer_step
from deploy.grids import weight_grid, weight_integers
from deploy.onnx_qdq import export_onnx
from deploy.packed import load_packed, load_packed_network, pack_codes, round_trip_identical, save_packed, unpack_codes
from deploy.verify import compare
from lightning_modules.models import build_model
from quantizers import QuantSpec, parameter_groups, quantize_model, quantized_layers

METHODS = {  # id -> spec: the five of issue 12 (W8A8 and W2A2 exports run with -m slow)
    "lsq-W8A8": QuantSpec(method="lsq", weight_bits=8),
    "lsq-W4A4": QuantSpec(method="lsq", weight_bits=4),
    "pact_dorefa-W4A4": QuantSpec(method="pact_dorefa", weight_bits=4),
    "dorefa-W4": QuantSpec(method="dorefa", weight_bits=4),
    "lsq-W2A2": QuantSpec(method="lsq", weight_bits=2),
}


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    data = DigitsDataModule()
    data.setup("fit")

    def tensors(dataset):
        images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2)
        return data.normalize(images), torch.from_numpy(dataset.labels)

    train_x, train_y = tensors(data.train_set)
    test_x, test_y = tensors(data.test_sets["clean"])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _fit(net: nn.Module, digits, steps: int, lr: float, seed: int = 0) -> nn.Module:
    optimizer = torch.optim.SGD(parameter_groups(net, 1e-4), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        index = torch.randint(0, len(digits["train_x"]), (64,), generator=generator)
        loss = F.cross_entropy(net(digits["train_x"][index]), digits["train_y"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # BatchNorm statistics over the whole training set, so the short fit is a usable classifier in eval mode.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for start in range(0, len(digits["train_x"]), 256):
            net(digits["train_x"][start : start + 256])
    return net.eval()


@pytest.fixture(scope="module")
def fp32_net(digits) -> nn.Module:
    torch.manual_seed(0)
    return _fit(build_model("resnet20", 10), digits, steps=40, lr=0.05)


@pytest.fixture(scope="module")
def quantized_nets(fp32_net, digits) -> dict[str, nn.Module]:
    """Each method fine-tuned for a few steps from the same FP32 start."""
    nets = {}
    for name, spec in METHODS.items():
        net = quantize_model(copy.deepcopy(fp32_net), spec)
        nets[name] = _fit(net, digits, steps=10, lr=0.01)
    return nets


def accuracy(net, digits) -> float:
    with torch.no_grad():
        return (net(digits["test_x"]).argmax(1) == digits["test_y"]).float().mean().item()


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", [pytest.param(m, marks=SLOW) if m in ("lsq-W8A8", "lsq-W2A2") else m
                                    for m in METHODS])
def test_onnx_runtime_agrees_with_the_fake_quant_model(method, quantized_nets, digits, tmp_path):
    net = quantized_nets[method]
    report = export_onnx(net, digits["test_x"][:2], tmp_path / "model.onnx")
    result = compare(report.path, net, digits["test_x"])
    step = last_layer_step(net)
    print(f"{method}: test accuracy {100 * accuracy(net, digits):.1f} %, {result.describe()}"
          + (f", {result.max_difference / step:.2f} last-layer steps of {step:.3g}" if step else ""))
    assert result.images == 360
    assert result.top1_agreement >= 0.995
    if step is not None:
        # Quantized activations: ONNX Runtime sums in another order than PyTorch, and an input that lands within
        # a float rounding of a level boundary rounds the other way. Such a flip in a coarse 4-bit layer moves
        # the logits by far more than a step of the 8-bit last layer (PACT W4A4: ~30 of them), so the bound is
        # on the logit range: measured 0.9 % (LSQ W8A8, W4A4) to 3.4 % (PACT W4A4, LSQ W2A2).
        assert result.max_difference <= 0.05 * result.output_range
    else:  # weights only: the same levels in float, so only float rounding separates them
        assert result.max_difference <= 1e-4 * result.output_range

    graph = onnx.load(str(report.path)).graph
    kinds = [node.op_type for node in graph.node]
    layers = quantized_layers(net)
    weight_dequantizers = [n for n in graph.node if n.op_type == "DequantizeLinear"
                           and n.input[0].endswith(".weight_integers")]
    assert len(weight_dequantizers) == len(layers)  # every quantized layer's weight is an integer initializer
    spec = METHODS[method]
    act_layers = sum(1 for layer in layers.values() if layer.input_quantizer is not None)
    assert kinds.count("QuantizeLinear") == act_layers
    # below 8 bits the b-bit grid is a Clip between QuantizeLinear and DequantizeLinear
    narrow = sum(1 for layer in layers.values()
                 if layer.input_quantizer is not None and layer.input_quantizer.bits < 8)
    assert kinds.count("Clip") == narrow
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    body = initializers["layer2.1.conv1.weight_integers"]
    expected_dtype = np.int16 if spec.method != "lsq" and spec.weight_bits == 8 else np.int8
    assert body.dtype == expected_dtype
    if spec.method == "lsq":
        assert body.min() >= -(2 ** (spec.weight_bits - 1)) and body.max() <= 2 ** (spec.weight_bits - 1) - 1
    else:  # DoReFa: odd integers in [-(2^b - 1), 2^b - 1]
        assert (body % 2 == 1).all() and np.abs(body).max() <= 2**spec.weight_bits - 1


def test_onnx_levels_are_the_fake_quant_levels(quantized_nets):
    """The graph's weights, DequantizeLinear(integers, scale), are the quantizers' outputs."""
    for method, net in quantized_nets.items():
        for name, layer in quantized_layers(net).items():
            grid = weight_grid(layer, name)
            integers = weight_integers(layer, grid, name)
            levels = integers.float() * grid.broadcast_scale(integers.dim())
            with torch.no_grad():
                fake = layer.weight_quantizer(layer.weight)
            tolerance = 0 if method.startswith("lsq") else 1e-6 * fake.abs().max().item()  # DoReFa: float ulps
            assert (levels - fake).abs().max().item() <= tolerance, (method, name)


@SLOW
def test_fold_bn_keeps_agreement_and_integers(quantized_nets, digits, tmp_path):
    net = quantized_nets["lsq-W4A4"]
    report = export_onnx(net, digits["test_x"][:2], tmp_path / "folded.onnx", fold_bn=True)
    assert len(report.folded) == 21 and report.not_folded == []
    graph = onnx.load(str(report.path)).graph
    assert "BatchNormalization" not in [n.op_type for n in graph.node]
    integers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}["layer1.0.conv1.weight_integers"]
    expected = weight_integers(net.layer1[0].conv1, weight_grid(net.layer1[0].conv1)).numpy()
    assert (integers == expected).all()  # folding changed the scales only
    result = compare(report.path, net, digits["test_x"])
    print(f"lsq-W4A4 with folded BatchNorm: {result.describe()}")
    assert result.top1_agreement >= 0.995 and result.max_difference <= 0.05 * result.output_range


class _PoolThenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_after_conv = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.bn_after_pool = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn_after_conv(self.conv(x))))
        return self.fc(torch.flatten(self.bn_after_pool(x), 1))


def test_fold_bn_says_where_it_cannot(tmp_path):
    torch.manual_seed(0)
    net = quantize_model(_PoolThenNorm(), QuantSpec(method="lsq", weight_bits=4, act_signed=True))
    images = torch.randn(64, 3, 32, 32)
    net.train()
    net(images)  # initialises the activation steps and the BatchNorm statistics
    net.eval()
    report = export_onnx(net, images[:2], tmp_path / "m.onnx", fold_bn=True)
    assert report.folded == ["conv"]
    assert len(report.not_folded) == 1 and "MaxPool" in report.not_folded[0][1]
    result = compare(report.path, net, images)
    assert result.max_difference <= 1e-4 * result.output_range


@SLOW
def test_fp32_exports_plain_float(fp32_net, digits, tmp_path):
    report = export_onnx(fp32_net, digits["test_x"][:2], tmp_path / "fp32.onnx")
    kinds = {n.op_type for n in onnx.load(str(report.path)).graph.node}
    assert not kinds & {"QuantizeLinear", "DequantizeLinear"}
    result = compare(report.path, fp32_net, digits["test_x"])
    assert result.top1_agreement == 1.0 and result.max_difference <= 1e-4 * result.output_range


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_and_unpack_codes(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=1001, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.size == -(-1001 * bits // 8)  # b bits per weight, rounded up to whole bytes
    assert (unpack_codes(packed, bits, codes.size) == codes).all()
    if bits == 4:  # two codes per byte, the first in the high nibble
        assert packed[0] == (codes[0] << 4) | codes[1]


def test_packed_round_trip_is_bitwise(quantized_nets, digits, tmp_path):
    for method, net in quantized_nets.items():
        report = save_packed(net, tmp_path / f"{method}.safetensors")
        from deploy.packed import _read

        tensors, metadata = _read(report.path)
        rebuilt = load_packed_network(build_model("resnet20", 10), tensors, metadata)
        same, total = round_trip_identical(net, rebuilt, digits["test_x"])
        bits = METHODS[method].weight_bits
        count, size = report.by_bits()[bits]
        print(f"{method}: {report.size:,} bytes packed; {bits}-bit weights {count:,} -> {size:,} bytes; "
              f"rebuilt outputs bitwise identical on {same}/{total}")
        assert same == total == 360
        assert size == -(-count * bits // 8) or bits != 8 and size <= count * bits // 8 + 21  # per-layer rounding
        for name, layer in quantized_layers(rebuilt).items():  # and so are the integer weights
            original = quantized_layers(net)[name]
            grid = weight_grid(original, name)
            assert torch.equal(weight_integers(layer, weight_grid(layer, name), name),
                               weight_integers(original, grid, name))


# ---------------------------------------------------------------- cli.py export, end to end


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory) -> Path:
    """A digits LSQ W4A4 run from `cli.py fit` (a few steps: the export path, not accuracy, is under test)."""
    run = tmp_path_factory.mktemp("export-run") / "run"
    status = run_cli(
        "fit", "--config", str(REPO / "configs" / "digits_resnet20_lsq4.yaml"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.init_args.corrupted_test.corruptions", "[]",
        "--flatness.enabled", "false", "--test_after_fit", "false")
    assert status == 0
    return run


def _export(run: Path, out: Path, *extra: str) -> int:
    return run_cli("export", "--config", str(REPO / "configs" / "digits_resnet20_lsq4.yaml"),
                   "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), *extra)


def test_cli_export_onnx_and_int(lsq_run, tmp_path, capsys):
    assert _export(lsq_run, tmp_path / "model.onnx") == 0
    printed = capsys.readouterr().out
    assert "20 x W4A4" in printed and "top-1 agreement" in printed
    agreement = float(printed.split("top-1 agreement ")[1].split("(")[1].split(" %")[0])
    assert agreement >= 99.5
    assert (tmp_path / "model.onnx").is_file()

    assert _export(lsq_run, tmp_path / "model.safetensors", "--format", "int") == 0
    printed = capsys.readouterr().out
    assert "4-bit weights: 269,824" in printed and "bitwise identical to the checkpoint's on 360/360" in printed
    module = load_packed(tmp_path / "model.safetensors")
    assert type(module).__name__ == "ClassificationModule"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@SLOW
def test_cli_export_of_fp32_checkpoint_is_float_onnx_but_not_int(tmp_path, capsys, lsq_run):
    fp32 = tmp_path / "fp32"
    assert run_cli(
        "fit", "--config", str(REPO / "configs" / "digits_resnet20_fp32.yaml"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir",
        str(fp32), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.corrupted_test.corruptions", "[]", "--flatness.enabled", "false",
        "--test_after_fit", "false") == 0
    capsys.readouterr()
    ckpt = str(fp32 / "checkpoints" / "last.ckpt")
    config = str(REPO / "configs" / "digits_resnet20_fp32.yaml")
    assert run_cli("export", "--config", config, "--ckpt_path", ckpt, "--out", str(tmp_path / "f.onnx"),
                   "--verify", "false") == 0
    assert "float model" in capsys.readouterr().out
    assert run_cli("export", "--config", config, "--ckpt_path", ckpt, "--out", str(tmp_path / "f.st"),
                   "--format", "int") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FP32 model" in err[0] and not (tmp_path / "f.st").exists()


def _no_spec_checkpoint(lsq_run: Path, folder: Path) -> Path:
    checkpoint = torch.load(lsq_run / "checkpoints" / "last.ckpt", weights_only=False)
    del checkpoint["quantization"]
    path = folder / "nospec.ckpt"
    torch.save(checkpoint, path)
    return path


BAD = {
    # case -> (extra arguments or a function making them, text the one line must contain)
    "unknown format": (["--format", "tflite"], "tflite"),
    "unwritable output (a file used as a folder)": (lambda run, tmp: ["--out", str(tmp / "file.txt" / "m.onnx")],
                                                    "is not a folder"),
    "output is a folder": (lambda run, tmp: ["--out", str(tmp)], "it is a folder"),
    "no spec, quantized format": (lambda run, tmp: ["--ckpt_path", str(_no_spec_checkpoint(run, tmp)),
                                                    "--format", "int"], "holds no quantization spec"),
    "no spec, quantized config": (lambda run, tmp: ["--ckpt_path", str(_no_spec_checkpoint(run, tmp))],
                                  "holds no quantization spec"),
    "config disagrees with checkpoint": (["--quantization.weight_bits", "2"], "trained as lsq W4A4"),
    # the same label on both sides: the line names the fields that differ, with both values
    "config disagrees in fields its label does not show": (
        ["--quantization.per_channel", "true", "--quantization.first_layer_bits", "4"],
        "trained as lsq W4A4 but the config asks for lsq W4A4 (first_layer_bits: checkpoint 8, config 4; "
        "per_channel: checkpoint false, config true)"),
    "missing checkpoint": (lambda run, tmp: ["--ckpt_path", str(tmp / "none.ckpt")], "none.ckpt does not exist"),
    "not a checkpoint": (lambda run, tmp: ["--ckpt_path", str(tmp / "file.txt")], "file.txt cannot be loaded"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_export_bad_input_is_one_line_and_writes_nothing(case, lsq_run, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a checkpoint")
    extra, expected = BAD[case]
    extra = extra(lsq_run, tmp_path) if callable(extra) else extra
    before = sorted(p.name for p in tmp_path.rglob("*"))
    status = run_cli("export", "--config", str(REPO / "configs" / "digits_resnet20_lsq4.yaml"),
                     "--ckpt_path", str(lsq_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "m.onnx"),
                     *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("qreg: error:") and expected in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temporary file left


def test_cli_export_that_fails_its_check_writes_nothing(lsq_run, tmp_path, capsys):
    """An agreement below --min_agreement (here an impossible 101 %) ends with status 1 and no file."""
    assert _export(lsq_run, tmp_path / "model.onnx", "--min_agreement", "1.01") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export check failed" in err[0] and "was not written" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_detection_agreement_matches_boxes_after_nms_by_class_and_overlap():
    from deploy.verify import detection_agreement

    # one image, three anchors, two classes: (4 + 2, anchors) with boxes as cx, cy, w, h
    reference = np.zeros((1, 6, 3), dtype=np.float32)
    reference[0, :, 0] = [20, 20, 10, 10, 0.9, 0.0]  # class 0
    reference[0, :, 1] = [60, 60, 10, 10, 0.0, 0.8]  # class 1
    reference[0, :, 2] = [90, 90, 10, 10, 0.1, 0.0]  # below the score threshold: not a detection
    same = detection_agreement(reference, reference.copy())
    assert (same.reference, same.matched, same.exported) == (2, 2, 2)

    moved = reference.copy()
    moved[0, 0, 0] += 3.0  # IoU 7/13 with the original box
    moved[0, 4:, 1] = [0.8, 0.0]  # same box, other class
    differs = detection_agreement(reference, moved)
    assert (differs.reference, differs.matched, differs.exported) == (2, 0, 2)
    assert "0/2 of PyTorch's found again" in differs.describe()
