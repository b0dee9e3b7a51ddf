"""Detection: YOLOv5n on synthetic rectangles and VOC-layout files, on CPU, in seconds.

The anchor-based model's own tests are in test_detection_anchor.py. Covers ultralytics' YOLOv5u (model: yolov5nu)
and its quantization policy on the real module names, the batch format, the letterbox and the corrupted
splits (native resolution, boxes unchanged, deterministic per image), NMS without a time limit, difficult
objects ignored by mAP, a quantized checkpoint reproducing its mAP through `cli.py test --ckpt_path` and
exporting to ONNX through `cli.py export`, local pretrained weights, and bad input ending in one line and exit
status 2. FP32 and LSQ W8A8 learning the rectangles (mAP50 > 50 %, 12 epochs) and the DoReFa W4 fit and export
are in the slow tier.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "qreg-yolo-settings"))
os.environ.setdefault("YOLO_OFFLINE", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from conftest import REPO, SHARED_DATA, assert_yolo_lsq_policy, quant_fragment, run_cli  # noqa: E402
from datamodules import DataError, RectanglesDataModule, VOCDataModule  # noqa: E402
from datamodules.corruptions.splits import CorruptedTest  # noqa: E402
from datamodules.detection import (  # noqa: E402
    Augmentation,
    DetectionDataset,
    DetectionRecord,
    detection_collate,
    letterbox,
)
from lightning_modules import DetectionModule  # noqa: E402
from lightning_modules.yolo import (  # noqa: E402
    check_quantization_policy,
    head_output_convs,
    non_max_suppression,
    to_original_coordinates,
)
from quantizers import QuantConv2d, QuantSpec, QuantSpecError, quantize_model  # noqa: E402
from records.run_files import read_epoch_metrics  # noqa: E402
from records.store import read_rows  # noqa: E402

NO_CORRUPTIONS = ["--data.init_args.corrupted_test.corruptions", "[]"]
CORRUPTIONS = ["--data.init_args.corrupted_test.corruptions", "[gaussian_noise, fog]",
               "--data.init_args.corrupted_test.severities", "[3]"]
QUANT = REPO / "configs" / "quant"
# What makes the rectangles learnable in 12 epochs on CPU (docs/detection.md): BatchNorm momentum 0.1, one
# warm-up epoch, lr 0.02, a step every batch (no accumulation to 64 images), no augmentation, 128 px. (The
# anchor-based loss scales objectness by (128 / 640)^2, so it learns a tiny set slower than YOLOv5u did in 8.)
FAST_TRAINING = [
    "--data", "RectanglesDataModule",
    "--model", "DetectionModule",
    "--model.init_args.bn_momentum", "0.1",
    "--model.init_args.warmup_epochs", "1",
    "--model.init_args.accumulate_to_nominal", "false",
    "--model.init_args.lr", "0.02",
    "--data.init_args.augment", "false",
    "--trainer.max_epochs", "12",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    *NO_CORRUPTIONS,
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # YOLO on 2 shared cores (conftest)


# ---------------------------------------------------------------------------------------------- the model


def test_yolov5nu_is_the_anchor_free_v5u_with_the_expected_layers():
    module = DetectionModule(model="yolov5nu", num_classes=20)
    net = module.net
    assert sum(p.numel() for p in net.parameters()) == 2_512_364  # YOLOv5u, 20 classes (v5 anchor-based: 1.79 M)
    assert type(net.model[-1]).__name__ == "Detect" and net.model[-1].reg_max == 16
    assert sorted(head_output_convs(net)) == [f"model.24.cv{b}.{i}.2" for b in (2, 3) for i in range(3)]
    from ultralytics.nn.modules import Conv

    assert sum(isinstance(m, Conv) for m in net.modules()) == 69
    assert isinstance(net.get_submodule("model.24.dfl.conv"), nn.Conv2d)


def test_v5u_lsq_policy_keeps_dfl_float_and_head_outputs_at_8_bits():
    net = DetectionModule(model="yolov5nu", num_classes=20).net
    quantize_model(net, QuantSpec(**quant_fragment("yolov5u_lsq4")))
    assert type(net.get_submodule("model.24.dfl.conv")) is nn.Conv2d  # not swapped at all
    heads = head_output_convs(net)
    assert len(heads) == 6
    assert_yolo_lsq_policy(net, heads, body_layers=68)
    check_quantization_policy(net)


def test_v5u_dorefa_policy_quantizes_weights_only_and_keeps_the_heads_float():
    net = DetectionModule(model="yolov5nu", num_classes=20).net
    quantize_model(net, QuantSpec(**quant_fragment("yolov5u_dorefa4")))
    assert type(net.get_submodule("model.24.dfl.conv")) is nn.Conv2d
    assert all(type(m) is nn.Conv2d for m in head_output_convs(net).values())
    swapped = [m for m in net.modules() if isinstance(m, QuantConv2d)]
    assert len(swapped) == 69 and all(m.input_quantizer is None for m in swapped)


def test_a_quantized_dfl_conv_is_refused():
    net = DetectionModule(model="yolov5nu", num_classes=3).net
    quantize_model(net, QuantSpec(method="lsq", weight_bits=4, act_signed=True))
    with pytest.raises(QuantSpecError, match="DFL conv"):
        check_quantization_policy(net)


def test_pretrained_weights_come_from_a_local_file_only(tmp_path):
    source = DetectionModule(num_classes=3)
    path = tmp_path / "weights.pt"
    torch.save(source.net.state_dict(), path)
    loaded = DetectionModule(num_classes=3, pretrained=str(path))
    for key, value in source.net.state_dict().items():
        assert torch.equal(value, loaded.net.state_dict()[key])
    other = DetectionModule(num_classes=5, pretrained=str(path))  # another head: the rest is copied
    assert torch.equal(other.net.model[0].conv.weight, source.net.model[0].conv.weight)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        DetectionModule(num_classes=3, pretrained=str(tmp_path / "yolov5nu.pt"))


# ----------------------------------------------------------------------------------------------- the data


def test_batches_are_in_ultralytics_format_and_keep_the_native_ground_truth():
    data = RectanglesDataModule(source_size=96, image_size=128, augment=False, corrupted_test=CorruptedTest([]))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["img"].shape == (16, 3, 128, 128) and batch["img"].dtype == torch.uint8
    assert batch["bboxes"].dtype == torch.float32 and batch["cls"].shape == (len(batch["bboxes"]), 1)
    assert batch["batch_idx"].shape == (len(batch["bboxes"]),)
    assert 0 <= batch["bboxes"].min() and batch["bboxes"].max() <= 1
    # normalised cx, cy, w, h -> letterboxed pixels -> native pixels gives back the original boxes
    for i in range(4):
        mine = batch["batch_idx"] == i
        cx, cy, w, h = (batch["bboxes"][mine] * 128).T
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
        native = to_original_coordinates(xyxy, batch["ratio_pad"][i], batch["ori_shape"][i])
        torch.testing.assert_close(native, batch["ori_boxes"][i], atol=1e-3, rtol=0)


def test_letterbox_keeps_the_aspect_ratio_and_centres():
    image = np.zeros((100, 200, 3), np.uint8)
    out, scale, (left, top) = letterbox(image, 64)
    assert out.shape == (64, 64, 3) and scale == 0.32 and (left, top) == (0, 16)
    assert (out[:16] == 114).all() and (out[16:48] == 0).all() and (out[48:] == 114).all()


def test_augmentation_moves_boxes_with_the_image_and_is_reproducible():
    data = RectanglesDataModule(corrupted_test=CorruptedTest([]))
    data.setup("fit")
    torch.manual_seed(3)
    first = [data.train_set[i] for i in range(8)]
    torch.manual_seed(3)
    data.train_set._transform = None
    second = [data.train_set[i] for i in range(8)]
    pairs = zip(first, second, strict=True)
    assert all(torch.equal(a["img"], b["img"]) and torch.equal(a["bboxes"], b["bboxes"]) for a, b in pairs)
    plain = DetectionDataset(data.train_set.records, 128, data.load_image)  # letterbox only
    assert sum(not torch.equal(a["bboxes"], plain[i]["bboxes"]) for i, a in enumerate(first)) >= 6
    for sample in first:  # every surviving box still covers its rectangle's colour
        image = sample["img"].permute(1, 2, 0).numpy().astype(int)
        for (cx, cy, w, h), cls in zip(sample["bboxes"].numpy() * 128, sample["cls"].numpy(), strict=True):
            patch = image[int(cy - h / 4) : int(cy + h / 4) + 1, int(cx - w / 4) : int(cx + w / 4) + 1]
            assert patch.reshape(-1, 3).mean(0).argmax() == cls or w < 8 or h < 8


def test_mosaic_combines_four_images_keeps_boxes_on_their_objects_and_switches_off_at_the_end():
    still = Augmentation(mosaic=1.0, close_mosaic=2, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0, scale=0, translate=0)
    data = RectanglesDataModule(augmentation=still, corrupted_test=CorruptedTest([]))
    data.setup("fit")
    torch.manual_seed(0)
    mosaics = [data.train_set[i] for i in range(12)]
    plain = DetectionDataset(data.train_set.records, 128, data.load_image)
    assert sum(len(m["cls"]) for m in mosaics) > sum(len(plain[i]["cls"]) for i in range(12))  # 4 images' objects
    for sample in mosaics:  # every box still lies on a rectangle of its class's colour
        image = sample["img"].permute(1, 2, 0).numpy().astype(int)
        for (cx, cy, w, h), cls in zip(sample["bboxes"].numpy() * 128, sample["cls"].numpy(), strict=True):
            patch = image[int(cy - h / 4) : int(cy + h / 4) + 1, int(cx - w / 4) : int(cx + w / 4) + 1]
            assert patch.reshape(-1, 3).mean(0).argmax() == cls or w < 8 or h < 8
    data.set_epoch(7, 10)  # epochs 8 and 9 of 10 are the last two: mosaic still on in epoch 7
    assert data.train_set.mosaic_active
    data.set_epoch(8, 10)
    assert not data.train_set.mosaic_active
    assert all(torch.equal(data.train_set[i]["bboxes"], plain[i]["bboxes"]) for i in range(4))


def test_corrupted_splits_corrupt_native_images_deterministically_and_keep_boxes():
    settings = CorruptedTest(["gaussian_noise", "fog"], [1, 5], profile="imagenet", seed=7)
    data = RectanglesDataModule(test_size=6, corrupted_test=settings)
    data.setup("test")
    assert data.test_split_names == ["clean", "gaussian_noise/1", "gaussian_noise/5", "fog/1", "fog/5"]
    clean, noisy = data.test_sets["clean"][2], data.test_sets["gaussian_noise/5"][2]
    assert not torch.equal(clean["img"], noisy["img"])
    assert torch.equal(clean["ori_boxes"], noisy["ori_boxes"]) and torch.equal(clean["bboxes"], noisy["bboxes"])
    again = RectanglesDataModule(test_size=6, corrupted_test=settings)
    again.setup("test")
    assert torch.equal(again.test_sets["gaussian_noise/5"][2]["img"], noisy["img"])
    # the corruption is applied before the letterbox: it equals corrupting the native image with index=2
    from datamodules.corruptions import corrupt

    native = data.load_image(data.test_sets["clean"].records[2].image)
    expected, _, _ = letterbox(corrupt(native, "gaussian_noise", 5, "imagenet", 7, index=2), 128)
    assert torch.equal(noisy["img"], torch.from_numpy(expected).permute(2, 0, 1))
    voc_default = inspect.signature(VOCDataModule).parameters["corrupted_test"].default
    assert voc_default.profile == "imagenet" and len(voc_default.splits()) == 95  # VOC: imagenet profile, 19 x 5
    default = RectanglesDataModule().corrupted_test
    assert default.profile == "imagenet" and len(default.splits()) == 95


# ------------------------------------------------------------------------------------------ NMS and mAP


def test_nms_matches_ultralytics_without_a_time_limit():
    from ultralytics.utils.nms import non_max_suppression as ultralytics_nms

    torch.manual_seed(0)
    boxes = torch.cat([torch.rand(2, 2, 3000) * 300 + 20, torch.rand(2, 2, 3000) * 60 + 5], dim=1)
    prediction = torch.cat([boxes, torch.rand(2, 4, 3000) ** 4], dim=1)  # many candidates, 4 classes
    ours = non_max_suppression(prediction, 0.001, 0.7, max_det=300)
    theirs = ultralytics_nms(prediction, 0.001, 0.7, multi_label=True, max_det=300, max_time_img=1e9)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == len(b) == 300
        torch.testing.assert_close(a[:, 4].sort(descending=True).values, b[:, 4].sort(descending=True).values)


def test_difficult_objects_are_ignored_by_map():
    module = DetectionModule(num_classes=3)
    metric = module._new_map()
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90]]), "labels": torch.tensor([0, 1]),
                "iscrowd": torch.tensor([0, 1])}]
    found_easy = {"boxes": torch.tensor([[10.0, 10, 50, 50]]), "scores": torch.tensor([0.9]),
                  "labels": torch.tensor([0])}
    metric.update([found_easy], targets)  # missing the difficult object costs nothing
    assert metric.compute()["map_50"].item() == pytest.approx(1.0)
    metric.reset()
    both = {"boxes": torch.tensor([[60.0, 60, 90, 90], [10, 10, 50, 50]]), "scores": torch.tensor([0.95, 0.9]),
            "labels": torch.tensor([1, 0])}
    metric.update([both], targets)  # and finding it is no false positive
    assert metric.compute()["map_50"].item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ training


def fit_study(folder: Path, epochs: int) -> Path:
    """FP32 and LSQ W8A8 fitted on the rectangles (128 px) as two cells of one study folder, each tested on the
    clean split and two benchmark corruptions at severity 3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cell, quant in (("fp32-seed0", []), ("lsq-w8a8-seed0", ["--quantization", str(QUANT / "yolo_lsq8.yaml")])):
            args = [*FAST_TRAINING, *quant, "--trainer.max_epochs", str(epochs),
                    "--trainer.default_root_dir", str(folder / "cells" / cell),
                    "--results.path", str(folder / "results.jsonl"), "--results.study", "detection",
                    "--results.run", cell, *CORRUPTIONS]
            assert run_cli("fit", *args) == 0
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture(scope="module")
def trained_study(tmp_path_factory) -> Path:
    """The two cells trained for 12 epochs: long enough to learn the rectangles (the slow tier, 140 s)."""
    return fit_study(tmp_path_factory.mktemp("detection-study"), epochs=12)


@pytest.fixture(scope="module")
def short_study(tmp_path_factory) -> Path:
    """The two cells after 3 epochs (mAP50 of a few %): every path a trained detector takes, in seconds."""
    return fit_study(tmp_path_factory.mktemp("detection-short-study"), epochs=3)


def cell_rows(study: Path, cell: str, metric: str = "map50") -> list[dict]:
    return [r for r in read_rows(study / "results.jsonl") if r["run"] == cell and r["metric"] == metric]


@pytest.mark.slow
def test_fp32_and_lsq8_learn_the_rectangles(trained_study):
    for cell, method in (("fp32-seed0", "fp32"), ("lsq-w8a8-seed0", "lsq")):
        rows = cell_rows(trained_study, cell)
        clean = [r["value"] for r in rows if r["corruption"] == "clean"]
        print(f"\n{cell}: mAP50 " + ", ".join(f"{r['corruption']}/{r['severity']} {r['value']:.1f}" for r in rows))
        assert len(clean) == 1 and clean[0] > 50.0, (cell, clean)
        assert {(r["model"], r["dataset"], r["method"]) for r in rows} == {("yolov5n", "rectangles", method)}
        assert {(r["corruption"], r["severity"]) for r in rows} == {("clean", 0), ("gaussian_noise", 3), ("fog", 3)}
        assert len(cell_rows(trained_study, cell, "map50_95")) == 3
        epochs = read_epoch_metrics(trained_study / "cells" / cell / "metrics.jsonl")
        assert len(epochs) == 12 and {"train/loss", "val/loss", "val/map50"} <= set(epochs[-1])
        assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]


def test_a_quantized_checkpoint_reproduces_its_map(short_study, tmp_path, capsys):
    checkpoint = short_study / "cells" / "lsq-w8a8-seed0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["quantization"]["method"] == "lsq"
    (trained,) = [r["value"] for r in cell_rows(short_study, "lsq-w8a8-seed0") if r["corruption"] == "clean"]
    assert trained > 0.0  # detections were made and matched: the equality below compares a real figure
    # Evaluated from the checkpoint with an FP32 config: the checkpoint's spec rebuilds the fake-quant layers
    # (and the EMA copy) before the weights load.
    store = tmp_path / "results.jsonl"
    assert run_cli("test", *FAST_TRAINING, "--ckpt_path", str(checkpoint), "--results.path", str(store)) == 0
    (again,) = [r["value"] for r in read_rows(store) if r["corruption"] == "clean" and r["metric"] == "map50"]
    assert again == trained
    assert "test mAP50 (%)" in capsys.readouterr().out

    module = DetectionModule.load_from_checkpoint(checkpoint)
    head = module.ema_net.get_submodule("model.24.m.0")
    assert isinstance(head, QuantConv2d) and head.input_quantizer.ready and head.weight_quantizer.bits == 8


@pytest.mark.slow
def test_dorefa_w4_trains_the_anchor_model_and_exports(tmp_path, capsys):
    """Weights-only DoReFa W4 (bare head outputs float), same 12-epoch budget: measured 56.1 % clean mAP50; its
    checkpoint exports to ONNX through `cli.py export`."""
    run = tmp_path / "dorefa4"
    args = [*FAST_TRAINING, "--quantization", str(QUANT / "yolo_dorefa4.yaml"), "--trainer.default_root_dir", str(run),
            "--results.path", str(tmp_path / "results.jsonl")]
    assert run_cli("fit", *args) == 0
    epochs = read_epoch_metrics(run / "metrics.jsonl")
    (clean,) = [r["value"] for r in read_rows(tmp_path / "results.jsonl")
                if r["metric"] == "map50" and r["corruption"] == "clean"]
    print(f"\ndorefa W4: train/loss {epochs[0]['train/loss']:.3f} -> {epochs[-1]['train/loss']:.3f}, "
          f"clean mAP50 {clean:.1f}")
    assert epochs[-1]["train/loss"] < 0.8 * epochs[0]["train/loss"] and clean > 30.0
    # Weights-only: the activations stay float, so only float rounding separates ONNX Runtime from PyTorch
    # (about 1e-5 of a raw map's range; a box's size multiplies a raw difference by an anchor of up to hundreds
    # of pixels, hence 1e-3 for the boxes).
    relative, detections = export_and_check(run, tmp_path / "yolov5n-dorefa4.onnx", capsys)
    print(f"DoReFa W4 YOLOv5n, ONNX Runtime vs PyTorch, largest difference / range: {relative}; "
          f"{detections.describe()}")
    assert detections.reference > 0 and detections.matched == detections.reference == detections.exported
    assert max(v for k, v in relative.items() if k.startswith("raw")) < 1e-4, relative
    assert relative["detections"] < 1e-3, relative


def test_the_study_report_has_the_detection_table(short_study):
    from study.report import write_report

    report = write_report(short_study, log_to_wandb=False).read_text()
    assert "## Detection robustness" in report
    lines = [line for line in report.splitlines() if line.startswith("| yolov5n | rectangles |")]
    assert len(lines) >= 2


def export_and_check(run: Path, out: Path, capsys, export_format: str = "onnx", *options: str):
    """`cli.py export --format onnx` (or `export_format`) of a run's last.ckpt with the run's own config.yaml
    (what a user has at hand after a fit), then the written graph against the checkpoint's network in ONNX
    Runtime on the 64 test images: the output names and shapes, and each output's largest difference as a
    fraction of its range."""
    import onnxruntime as ort

    from deploy.command import test_images
    from deploy.verify import compare

    checkpoint = run / "checkpoints" / "last.ckpt"
    assert run_cli("export", "--config", str(run / "config.yaml"), "--ckpt_path", str(checkpoint),
                   "--format", export_format, "--out", str(out), *options) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime (CPU) vs PyTorch on 64 images" in printed and "raw_stride32" in printed, printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["detections", "raw_stride8", "raw_stride16", "raw_stride32"]
    assert session.get_inputs()[0].shape == ["batch", 3, 128, 128]
    module = DetectionModule.load_from_checkpoint(checkpoint)
    images = test_images(RectanglesDataModule(augment=False), 64)
    assert images.shape == (64, 3, 128, 128) and 0.0 <= images.min() and images.max() <= 1.0
    result = compare(out, module.eval_net, images)
    shapes = [tuple(o.shape) for o in session.run(None, {"images": images[:3].numpy()})]
    assert shapes == [(3, 4 + 3, 3 * (16 * 16 + 8 * 8 + 4 * 4)), (3, 3, 16, 16, 8), (3, 3, 8, 8, 8), (3, 3, 4, 4, 8)]
    assert "detections after NMS" in printed
    return {o.name: o.relative for o in result.outputs}, result.detections


def test_a_quantized_detector_exports_to_onnx_and_runs_in_onnx_runtime(short_study, tmp_path, capsys):
    """LSQ W8A8 YOLOv5n (its EMA copy, as evaluated): QDQ on 60 convs, the decoded boxes and the three raw
    maps before NMS as outputs, each within the command's own check (5 % of its range) of PyTorch's. Not
    closer: an activation within a rounding of a level boundary lands on the neighbouring level in ONNX
    Runtime, and 60 layers carry the flip on."""
    import onnx

    out = tmp_path / "yolov5n-lsq8.onnx"
    relative, detections = export_and_check(short_study / "cells" / "lsq-w8a8-seed0", out, capsys)
    print(f"\nLSQ W8A8 YOLOv5n, ONNX Runtime vs PyTorch, largest difference / range: {relative}; "
          f"{detections.describe()}")
    assert max(relative.values()) < 0.05, relative
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_a_quantized_detector_exports_to_onnx_int8(short_study, tmp_path, capsys):
    """`--format onnx-int8` of the LSQ W8A8 detector: its convolutions as QLinearConv at new 8-bit points (a
    SiLU follows each) and the ops between them on integers, the 3 head convs kept as QDQ since their outputs
    are the network's; ONNX Runtime builds the graph (its QDQ propagation had failed on a dequantized head map)
    and the outputs pass the check."""
    import onnx

    out = tmp_path / "yolov5n-lsq8-int8.onnx"
    relative, _ = export_and_check(short_study / "cells" / "lsq-w8a8-seed0", out, capsys, "onnx-int8")
    # The raw maps within the check's 5 %; the decoded boxes are judged by the detections found again (this
    # 3-epoch model scores none above 0.25: the slow test below checks them on the 12-epoch one).
    assert max(v for name, v in relative.items() if name != "detections") < 0.05, relative
    nodes = onnx.load(str(out)).graph.node
    ops = [node.op_type for node in nodes]
    # The image conv too: the detector's images are 8-bit pixels / 255, which it reads as uint8 levels, exactly.
    assert ops.count("QLinearConv") == 57 and ops.count("Conv") == 3  # the 3 head convs
    assert {"QLinearSigmoid", "QLinearMul", "QLinearConcat", "QLinearAdd"} <= set(ops)  # SiLUs, C3s, bottlenecks
    # Written channels-last (deploy.channels_last): every integer conv, the SPPF's three max pools; Transposes
    # only for the image's integers in and the three head convs' inputs out.
    assert all(node.domain == "com.microsoft" for node in nodes if node.op_type == "QLinearConv")
    producers = {output: node for node in nodes for output in node.output}
    layout_moves = [node for node in nodes if node.op_type == "Transpose" and (
        producers[node.input[0]].op_type.startswith("QLinear") or producers[node.input[0]].op_type == "QuantizeLinear")]
    assert ops.count("NhwcMaxPool") == 3 and len(layout_moves) == 4  # (the head's decoding has its own Transposes)


def test_a_detector_whose_detections_are_not_found_again_is_not_written(short_study, tmp_path, capsys,
                                                                         monkeypatch):
    """Below --min_detections the export ends with status 1, one line, and no file (the check's own comparison
    made to find 9 of 10 detections again; the 3-epoch model detects nothing itself)."""
    import dataclasses

    import deploy.verify

    real_compare = deploy.verify.compare

    def nine_of_ten(*args, **kwargs):
        found = deploy.verify.DetectionAgreement(0.25, 0.9, reference=10, matched=9, exported=10,
                                                 matched_at_half=10)
        return dataclasses.replace(real_compare(*args, **kwargs), detections=found)

    monkeypatch.setattr(deploy.verify, "compare", nine_of_ten)
    run = short_study / "cells" / "lsq-w8a8-seed0"
    out = tmp_path / "m.onnx"
    assert run_cli("export", "--config", str(run / "config.yaml"), "--ckpt_path",
                   str(run / "checkpoints" / "last.ckpt"), "--out", str(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finds only 90.0 % of PyTorch's detections again (< 95.0 %)" in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_trained_quantized_detector_keeps_its_detections_in_onnx_runtime(trained_study, tmp_path, capsys):
    """The 12-epoch LSQ W8A8 model (the 3-epoch one scores no box above 0.25): its detections after NMS, found
    again in ONNX Runtime's."""
    relative, detections = export_and_check(trained_study / "cells" / "lsq-w8a8-seed0", tmp_path / "m.onnx", capsys)
    print(f"\n12-epoch LSQ W8A8 YOLOv5n, ONNX Runtime vs PyTorch, largest difference / range: {relative}; "
          f"{detections.describe()}")
    assert max(relative.values()) < 0.05, relative
    assert detections.reference > 0 and detections.matched >= 0.95 * detections.reference
    # The integer form. Each conv's output is a new 8-bit point (a SiLU follows every conv, so none can write
    # the next quantizer's integers), its step about that quantizer's: a second rounding that moves a third of
    # the next layer's integers by a level. Measured: 271/318 found again at IoU >= 0.9, all 318 at 0.5 (275 and
    # 318 with the image conv in float). So the default check (95 % at IoU 0.9) refuses the file; what it costs
    # is asserted here.
    relative, detections = export_and_check(trained_study / "cells" / "lsq-w8a8-seed0", tmp_path / "i.onnx",
                                            capsys, "onnx-int8", "--min_detections", "0")
    print(f"12-epoch LSQ W8A8 YOLOv5n onnx-int8: {relative}; {detections.describe()}")
    assert detections.matched_at_half >= 0.95 * detections.reference
    assert detections.matched >= 0.8 * detections.reference


# ----------------------------------------------------------------------------------------------- bad input


def write_image(path: Path, size=(40, 60)) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 128, np.uint8))


def write_voc(root: Path, ids: list[str], annotations: bool = True) -> Path:
    folder = root / "VOC2007"
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val"):
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for image_id in ids:
        write_image(folder / "JPEGImages" / f"{image_id}.jpg")
        if annotations:
            (folder / "Annotations").mkdir(exist_ok=True)
            (folder / "Annotations" / f"{image_id}.xml").write_text(
                "<annotation><size><width>60</width><height>40</height></size><object><name>dog</name>"
                "<difficult>0</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax>"
                "</bndbox></object></annotation>"
            )
    return root


def voc_args(root: Path, *extra: str) -> list[str]:
    return [
        "--data", "VOCDataModule", "--model", "DetectionModule", "--data.init_args.root", str(root),
        "--data.init_args.train_sets", "[2007/train]", "--data.init_args.val_sets", "[2007/val]",
        "--data.init_args.test_sets", "[2007/val]", "--data.init_args.image_size", "64",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", *NO_CORRUPTIONS, *extra,
    ]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, err
    assert err[-1].startswith("qreg: error:")
    return err[-1]


def test_voc_root_without_annotations(tmp_path, capsys):
    root = write_voc(tmp_path / "VOCdevkit", ["000001"], annotations=False)
    status = run_cli("fit", *voc_args(root, "--trainer.default_root_dir", str(tmp_path / "run")))
    assert status == 2
    assert "has no Annotations/" in one_error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_yolo_label_with_an_out_of_range_class(tmp_path, capsys):
    root = tmp_path / "yolo"
    for stem in ("a", "b"):
        write_image(root / "images" / "train" / f"{stem}.jpg")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("3 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "train" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n27 0.5 0.5 0.1 0.1\n")
    args = ["--data", "VOCDataModule", "--model", "DetectionModule", "--data.init_args.root", str(root),
            "--data.init_args.train_sets", "[train]", "--data.init_args.val_sets", "[train]",
            "--data.init_args.test_sets", "[train]", "--data.init_args.image_size", "64",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"), *NO_CORRUPTIONS]
    assert run_cli("fit", *args) == 2
    line = one_error_line(capsys)
    assert "b.txt:2: class 27 is out of range for 20 classes" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_does_not_decode(tmp_path, capsys, workers):
    root = write_voc(tmp_path / "VOCdevkit", ["000001", "000002"])
    (root / "VOC2007" / "JPEGImages" / "000002.jpg").write_bytes(b"not a jpeg")
    args = voc_args(root, "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--data.init_args.num_workers", str(workers), "--data.init_args.batch_size", "2")
    assert run_cli("fit", *args) == 2
    line = one_error_line(capsys)
    assert "cannot decode image" in line and "000002.jpg" in line and "Traceback" not in line


def test_a_bad_image_can_be_skipped_with_a_warning(tmp_path, caplog):
    root = write_voc(tmp_path / "VOCdevkit", ["000001", "000002"])
    (root / "VOC2007" / "JPEGImages" / "000002.jpg").write_bytes(b"not a jpeg")
    data = VOCDataModule(str(root), train_sets=["2007/train"], val_sets=["2007/val"], test_sets=["2007/val"],
                         image_size=64, on_bad_image="skip", corrupted_test=CorruptedTest([]))
    data.setup("test")
    with caplog.at_level("WARNING"):
        sample = data.train_set[1]
    assert sample["index"] == 0 and "000002.jpg" in caplog.text  # training: the next image takes its place
    # Evaluation: the bad image and its boxes leave the split; the good one is scored once.
    for loader in (data.val_dataloader(), *data.test_dataloader()):
        batches = list(loader)
        assert [b["index"].tolist() for b in batches] == [[0]]
        assert len(batches[0]["ori_boxes"]) == 1 and batches[0]["img"].shape[0] == 1
    assert detection_collate([None, None])["img"].shape[0] == 0


def test_voc_annotations_are_read_with_difficult_flags(tmp_path):
    root = write_voc(tmp_path / "VOCdevkit", ["000001"])
    xml = root / "VOC2007" / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("</annotation>", "<object><name>cat</name><difficult>1</difficult>"
                                           "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax>"
                                           "</bndbox></object></annotation>"))
    data = VOCDataModule(str(tmp_path), train_sets=["2007/train"], val_sets=["2007/val"], test_sets=["2007/val"],
                         image_size=64, corrupted_test=CorruptedTest([]))  # root above VOCdevkit works too
    data.setup("fit")
    test = data.test_sets["clean"].records[0]
    assert test.classes.tolist() == [11, 7] and test.difficult.tolist() == [False, True]
    assert test.boxes[1].tolist() == [0.0, 1.0, 10.0, 20.0]  # 1-based inclusive pixels -> continuous
    assert data.train_set.records[0].classes.tolist() == [11]  # difficult objects are not trained on
    batch = detection_collate([data.test_sets["clean"][0]])
    assert batch["difficult"][0].tolist() == [False, True] and batch["cls"].view(-1).tolist() == [11.0, 7.0]


def test_yolo_layout_reads_coco128():
    root = SHARED_DATA / "coco128"
    if not (root / "labels" / "train2017").is_dir():
        pytest.skip("../shared/data/coco128 is not available")
    data = VOCDataModule(str(root), train_sets=["train2017"], val_sets=["train2017"], test_sets=["train2017"],
                         class_names=80, image_size=160, augment=False, corrupted_test=CorruptedTest([]))
    assert data.layout == "yolo" and data.num_classes == 80 and data.name == "coco128"
    named = VOCDataModule(str(root), train_sets=["train2017"], val_sets=["train2017"], test_sets=["train2017"],
                          class_names=str(REPO / "configs" / "data" / "coco_names.yaml"), dataset_name="my-coco")
    assert named.class_names[:3] == ["person", "bicycle", "car"] and named.num_classes == 80
    assert named.name == "my-coco"
    data.setup("fit")
    assert len(data.train_set) == 128
    sample = data.val_set[0]  # 000000000009.jpg: 640x480, first label "45 0.479492 0.688771 0.955609 0.5955"
    assert sample["ori_shape"].tolist() == [480, 640] and sample["ori_cls"][0] == 45
    torch.testing.assert_close(sample["ori_boxes"][0], torch.tensor([(0.479492 - 0.955609 / 2) * 640,
                                                                     (0.688771 - 0.5955 / 2) * 480,
                                                                     (0.479492 + 0.955609 / 2) * 640,
                                                                     (0.688771 + 0.5955 / 2) * 480]), atol=0.05, rtol=0)
    batch = detection_collate([data.val_set[i] for i in range(4)])
    assert batch["img"].shape == (4, 3, 160, 160) and batch["cls"].max() < 80


def test_class_names_from_a_data_yaml_and_its_errors(tmp_path):
    from datamodules.yolo_format import class_names_from_data_yaml

    (tmp_path / "list.yaml").write_text("names: [cat, dog]\n")
    (tmp_path / "map.yaml").write_text("path: x\nnames:\n  0: cat\n  1: dog\n")
    (tmp_path / "gap.yaml").write_text("names:\n  0: cat\n  2: dog\n")
    (tmp_path / "none.yaml").write_text("path: x\n")
    assert class_names_from_data_yaml(tmp_path / "list.yaml") == ["cat", "dog"]
    assert class_names_from_data_yaml(tmp_path / "map.yaml") == ["cat", "dog"]
    for bad, message in (("gap", "indexed 0..1"), ("none", "no 'names:'"), ("missing", "not found")):
        with pytest.raises(DataError, match=message):
            class_names_from_data_yaml(tmp_path / f"{bad}.yaml")


def test_records_and_dataset_work_without_files():
    records = [DetectionRecord(0, np.array([[2, 2, 20, 10]], np.float32), np.array([1]), np.array([False]))]
    dataset = DetectionDataset(records, 32, load=lambda _: np.zeros((12, 24, 3), np.uint8))
    sample = dataset[0]
    assert sample["img"].shape == (3, 32, 32)
    # 12x24 -> scale 4/3, 8 px of padding above: the box lands at (2.7, 10.7, 26.7, 21.3) of 32
    torch.testing.assert_close(sample["bboxes"], torch.tensor([[11 / 24, 0.5, 18 / 24, 8 / 24]]), atol=1e-4, rtol=0)
    with pytest.raises(DataError, match="multiple of 32"):
        RectanglesDataModule(image_size=100)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("yolo_voc_*.yaml")))
def test_shipped_yolo_configs_resolve(config, capsys):
    assert run_cli("fit", "--config", str(REPO / "configs" / config), "--print_config") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    method = config.removeprefix("yolo_voc_").removesuffix(".yaml")
    method = method if method == "fp32" else method.rstrip("248")
    assert resolved["model"]["class_path"].endswith("DetectionModule")
    assert resolved["model"]["init_args"]["model"] == "yolov5n"  # the anchor-based model of the paper
    assert resolved["data"]["init_args"]["augmentation"]["mosaic"] == 1.0
    assert resolved["data"]["class_path"].endswith("VOCDataModule")
    assert resolved["data"]["init_args"]["corrupted_test"]["profile"] == "imagenet"
    assert resolved["quantization"]["method"] == method
    assert list(resolved["quantization"]["layer_bits"]) == ["model.24.m.?"]  # the anchor head's 3 bare convs
    assert resolved["trainer"]["max_epochs"] == 200
