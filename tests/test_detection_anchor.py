"""The anchor-based YOLOv5n (YOLOv5 v7.0, the paper's model): size, outputs, decoding, assignment, its loss
computed by hand on a one-target, one-anchor case, and its quantization policy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_yolo_lsq_policy, quant_fragment
from lightning_modules import DetectionModule
from lightning_modules.yolo import AnchorDetect, AnchorYOLOLoss, AnchorYOLOv5, build_yolo, head_output_convs
from lightning_modules.yolo.anchor_model import Conv
from quantizers import QuantConv2d, QuantSpec, quantize_model

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


@pytest.mark.parametrize(("classes", "parameters"), [(20, 1_790_977), (80, 1_872_157)])
def test_yolov5n_has_the_published_size(classes, parameters):
    net = build_yolo("yolov5n", classes)
    assert isinstance(net, AnchorYOLOv5)
    assert sum(p.numel() for p in net.parameters()) == parameters
    assert sorted(head_output_convs(net)) == ["model.24.m.0", "model.24.m.1", "model.24.m.2"]
    assert sum(isinstance(m, Conv) for m in net.modules()) == 57
    assert len({id(m.act) for m in net.modules() if isinstance(m, Conv)}) == 57  # each block its own SiLU


def test_the_detection_module_builds_the_anchor_model_by_default_and_v5u_on_request():
    assert isinstance(DetectionModule(num_classes=20).net, AnchorYOLOv5)
    v5u = DetectionModule(model="yolov5nu", num_classes=20).net
    assert sum(p.numel() for p in v5u.parameters()) == 2_512_364


def test_output_shapes_and_decoding():
    net = build_yolo("yolov5n", 20)
    images = torch.rand(2, 3, 128, 96)
    raw = net.train()(images)
    assert [tuple(p.shape) for p in raw] == [(2, 3, 16, 12, 25), (2, 3, 8, 6, 25), (2, 3, 4, 3, 25)]
    decoded, raw_eval = net.eval()(images)
    assert decoded.shape == (2, 4 + 20, 3 * (16 * 12 + 8 * 6 + 4 * 3))
    # One prediction by hand: level P4 (stride 16), anchor 1 (62 x 45 px), cell row 5, column 2.
    p = raw_eval[1][1, 1, 5, 2].sigmoid()
    index = 3 * 16 * 12 + (1 * 8 + 5) * 6 + 2
    expected_xy = (p[:2] * 2 - 0.5 + torch.tensor([2.0, 5.0])) * 16
    expected_wh = (p[2:4] * 2) ** 2 * torch.tensor([62.0, 45.0])
    torch.testing.assert_close(decoded[1, :2, index], expected_xy)
    torch.testing.assert_close(decoded[1, 2:4, index], expected_wh)
    torch.testing.assert_close(decoded[1, 4:, index], p[5:] * p[4])  # class score x objectness


def test_bias_initialisation_is_yolov5s_prior():
    detect = AnchorDetect(20, (4, 4, 4))
    before = [conv.bias.detach().clone().view(3, -1) for conv in detect.m]
    detect.initialize_biases()
    for conv, old, stride in zip(detect.m, before, (8, 16, 32), strict=True):
        shift = conv.bias.detach().view(3, -1) - old
        torch.testing.assert_close(shift[:, 4], torch.full((3,), math.log(8 / (640 / stride) ** 2)))
        torch.testing.assert_close(shift[:, 5:], torch.full((3, 20), math.log(0.6 / 19.00001)))
        torch.testing.assert_close(shift[:, :4], torch.zeros(3, 4))


def test_a_target_goes_to_its_cell_and_the_two_nearest_neighbours():
    loss = AnchorYOLOLoss(build_yolo("yolov5n", 3).detect)
    # 64 px input: P3 is 8 x 8 cells. Centre (3.2, 2.7) cells: nearer the left and the bottom border.
    # 24 x 16 px = 3 x 2 P3 cells: within 4x of all three P3 anchors (1.25 x 1.625, 2 x 3.75, 4.125 x 2.875).
    targets = torch.tensor([[0, 2, 3.2 / 8, 2.7 / 8, 24 / 64, 16 / 64]])
    images, anchors, gj, gi, boxes, classes = loss.assign(0, torch.Size((1, 3, 8, 8, 8)), targets)
    cells = sorted({(int(j), int(i)) for j, i in zip(gj, gi, strict=True)})
    assert cells == [(2, 2), (2, 3), (3, 3)]  # (row, column): centre, left, below
    assert sorted(set(anchors.tolist())) == [0, 1, 2] and len(anchors) == 9
    assert set(classes.tolist()) == {2} and set(images.tolist()) == {0}
    # Box targets are relative to the cell that learns them: x in (-0.5, 1.5).
    centre = (gj == 2) & (gi == 3)
    torch.testing.assert_close(boxes[centre][0], torch.tensor([0.2, 0.7, 3.0, 2.0]))
    left = (gi == 2)
    torch.testing.assert_close(boxes[left][0, :2], torch.tensor([1.2, 0.7]))
    # A target 5x wider than an anchor is not that anchor's.
    wide = torch.tensor([[0, 0, 0.5, 0.5, 50 / 64, 2 / 64]])
    assert len(loss.assign(0, torch.Size((1, 3, 8, 8, 8)), wide)[0]) == 0


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_the_loss_of_one_target_on_one_anchor_by_hand():
    # One level (stride 8, 64 px input: 8 x 8 cells), one anchor of 8 x 8 px (1 x 1 cell), two classes.
    detect = AnchorDetect(2, (4,), anchors=(((8, 8),),), strides=(8,))
    with torch.no_grad():
        detect.m[0].weight.zero_()
        detect.m[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0]))  # x y w h obj c0 c1
    raw = detect.train()([torch.zeros(1, 4, 8, 8)])
    # Target: class 0, centred in cell (column 3, row 2), 16 x 8 px = 2 x 1 cells.
    batch = {"batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1),
             "bboxes": torch.tensor([[3.5 / 8, 2.5 / 8, 16 / 64, 8 / 64]])}
    loss, parts = AnchorYOLOLoss(detect, balance=(4.0,))(raw, batch)

    # The prediction: centre (2 sigmoid(0) - 0.5 = 0.5 into the cell: the target's centre), size the anchor's.
    iou = 1.0 / 2.0  # a 1 x 1 box inside a 2 x 1 box with the same centre
    v = 4 / math.pi**2 * (math.atan(2 / 1) - math.atan(1 / 1)) ** 2
    ciou = iou - 0 - v * v / (1 - iou + v)  # centres coincide: no distance term
    levels = 3 / 1
    box = (1 - ciou) * 0.05 * levels
    # Objectness: 63 cells want 0, one wants the detached CIoU; all logits are -1; level weight 4.0.
    obj = (_softplus(-1.0) + ciou * 1.0 / 64) * 4.0 * 1.0 * (64 / 640) ** 2 * levels
    # Class: BCE of logits (1, 0) against one-hot (1, 0), mean over the 2 classes.
    cls = (_softplus(-1.0) + math.log(2)) / 2 * 0.5 * (2 / 80) * levels
    assert parts["box_loss"].item() == pytest.approx(box, rel=1e-5)
    assert parts["obj_loss"].item() == pytest.approx(obj, rel=1e-5)
    assert parts["cls_loss"].item() == pytest.approx(cls, rel=1e-5)
    assert loss.sum().item() == pytest.approx(box + obj + cls, rel=1e-5)  # x batch size 1
    # The objectness target (the CIoU, detached) carries no gradient into the box outputs; the box loss does.
    loss[1].backward(retain_graph=True)
    grad = detect.m[0].bias.grad.view(detect.na, -1)
    assert torch.all(grad[:, :4] == 0) and grad[0, 4].item() != 0.0
    detect.m[0].bias.grad = None
    loss[0].backward()
    assert detect.m[0].bias.grad.view(detect.na, -1)[0, :4].abs().sum().item() > 0.0


def test_an_empty_batch_has_only_the_objectness_loss():
    net = build_yolo("yolov5n", 3).train()
    raw = net(torch.rand(2, 3, 64, 64))
    empty = {"batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
    loss, parts = AnchorYOLOLoss(net.detect)(raw, empty)
    assert parts["box_loss"].item() == 0 and parts["cls_loss"].item() == 0 and parts["obj_loss"].item() > 0
    loss.sum().backward()


def test_lsq_policy_puts_the_bare_outputs_at_8_bits_and_gives_every_conv_its_own_quantizer():
    net = build_yolo("yolov5n", 20)
    quantize_model(net, QuantSpec(**quant_fragment("yolo_lsq4")))
    heads = head_output_convs(net)
    assert len(heads) == 3
    assert_yolo_lsq_policy(net, heads, body_layers=56)


def test_dorefa_policy_keeps_the_bare_outputs_float_and_activations_float():
    net = build_yolo("yolov5n", 20)
    quantize_model(net, QuantSpec(**quant_fragment("yolo_dorefa4")))
    assert all(type(m) is nn.Conv2d for m in head_output_convs(net).values())
    swapped = [m for m in net.modules() if isinstance(m, QuantConv2d)]
    assert len(swapped) == 57 and all(m.input_quantizer is None for m in swapped)
    net.eval()(torch.rand(1, 3, 64, 64))  # still runs


def _attached(module: DetectionModule, **trainer) -> DetectionModule:
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(**trainer)
    return module


@pytest.mark.parametrize(("max_epochs", "batches", "warmup"), [(1, 50, 0), (2, 50, 50), (200, 10, 30), (None, 10, 30)])
def test_warmup_is_ultralytics_8_4s_capped_at_epochs_minus_one_without_a_step_minimum(max_epochs, batches, warmup):
    module = _attached(DetectionModule(num_classes=3), max_epochs=max_epochs)
    assert module._warmup_batches(batches) == warmup


@pytest.mark.parametrize(("batch", "devices", "images", "epochs", "expected"),
                         [(16, 1, 1000, 10, 4), (64, 1, 1000, 10, 1), (16, 2, 1000, 10, 2), (8, 1, 16, 1, 2)])
def test_gradients_accumulate_to_the_nominal_batch(batch, devices, images, epochs, expected):
    from types import SimpleNamespace

    data = SimpleNamespace(batch_size=batch, train_set=range(images))
    module = _attached(DetectionModule(num_classes=3), accumulate_grad_batches=1, datamodule=data,
                       world_size=devices, max_epochs=epochs)
    module._accumulate_to_nominal()
    assert module.trainer.accumulate_grad_batches == expected
    kept = _attached(DetectionModule(num_classes=3, accumulate_to_nominal=False), accumulate_grad_batches=1,
                     datamodule=data, world_size=devices, max_epochs=epochs)
    kept._accumulate_to_nominal()
    assert kept.trainer.accumulate_grad_batches == 1


def test_the_loss_assigns_and_scores_in_float32_under_bf16():
    """bf16-mixed hands the loss bfloat16 outputs; targets in bfloat16 would move by up to half a cell at 640 px
    (its 8 significant bits), changing which cells learn them. The loss of bfloat16 outputs equals the loss of
    the same values in float32."""
    criterion = AnchorYOLOLoss(build_yolo("yolov5n", 20).model[-1])
    torch.manual_seed(0)
    raw = [torch.randn(2, 3, size, size, 25).bfloat16() for size in (80, 40, 20)]  # a 640 px image's levels
    batch = {"batch_idx": torch.tensor([0.0, 1.0, 1.0]), "cls": torch.tensor([[3.0], [7.0], [11.0]]),
             "bboxes": torch.tensor([[0.4023, 0.7988, 0.1, 0.2], [0.8555, 0.1211, 0.3, 0.05],
                                     [0.6211, 0.3789, 0.02, 0.04]])}
    in_bf16, parts_bf16 = criterion(raw, batch)
    in_fp32, parts_fp32 = criterion([r.float() for r in raw], batch)
    torch.testing.assert_close(in_bf16, in_fp32)
    assert in_bf16.dtype == torch.float32
