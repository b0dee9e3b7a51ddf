"""The YOLOv5 detectors, built offline, their losses, and the quantization policy that suits them.

- `yolov5n` (and s/m/l/x): the anchor-based YOLOv5 v7.0 of the paper, written here (`anchor_model.py`, loss in
  `anchor_loss.py`). Its head ends in 3 bare output convs (`model.24.m.?`, no BatchNorm after them).
- `yolov5nu` (and su/mu/lu/xu): ultralytics' **YOLOv5u**, `DetectionModel("yolov5n.yaml")`: the same backbone
  and neck with the anchor-free, decoupled YOLOv8 `Detect` head and its DFL (distribution focal loss) box
  decoder. The head ends in 6 bare output convs (3 box, 3 class branches) and a fixed DFL conv (arange
  weights, no gradient) that turns box distributions into distances at inference only.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from datamodules.errors import DataError
from lightning_modules.models import UnknownModelError
from lightning_modules.yolo.anchor_loss import ANCHOR_T, BOX_GAIN, CLS_GAIN, OBJ_GAIN, AnchorYOLOLoss
from lightning_modules.yolo.anchor_model import SCALES, AnchorYOLOv5
from quantizers import QuantConv2d, QuantSpecError, applied_spec

# The anchor-based YOLOv5 sizes (written here) and ultralytics' YOLOv5u sizes (scale from the name).
ANCHOR_MODELS = tuple(f"yolov5{scale}" for scale in SCALES)
V5U_MODELS = tuple(f"{name}u" for name in ANCHOR_MODELS)
YOLO_MODELS = ANCHOR_MODELS + V5U_MODELS
# Module names (the Detect head is layer 24 of yolov5*.yaml in both families).
DFL_CONV_PATTERN = "*.dfl.conv"
ANCHOR_HEAD_OUTPUT_PATTERNS = ("model.24.m.?",)
V5U_HEAD_OUTPUT_PATTERNS = ("model.24.cv2.?.2", "model.24.cv3.?.2")
HEAD_OUTPUT_PATTERNS = ANCHOR_HEAD_OUTPUT_PATTERNS + V5U_HEAD_OUTPUT_PATTERNS
# Loss gains of each family: YOLOv5's hyp.scratch-low (before its scaling), ultralytics' defaults.
DEFAULT_GAINS = {
    "anchor": {"box": BOX_GAIN, "obj": OBJ_GAIN, "cls": CLS_GAIN},
    "v5u": {"box": 7.5, "cls": 0.5, "dfl": 1.5},
}


def import_ultralytics():
    """Import ultralytics without network access or update checks (env set before the first import)."""
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import ultralytics

    return ultralytics


def is_anchor_based(net: nn.Module) -> bool:
    return isinstance(net, AnchorYOLOv5)


def build_yolo(name: str, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    """A randomly initialised detector; no weights are loaded, nothing is downloaded."""
    if name not in YOLO_MODELS:
        raise UnknownModelError(
            f"unknown model {name!r}; the detection module builds: {', '.join(YOLO_MODELS)} "
            "(yolov5n..x: anchor-based YOLOv5 v7.0, the paper's; the 'u' names: ultralytics' anchor-free YOLOv5u)"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UnknownModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name in ANCHOR_MODELS:
        net = AnchorYOLOv5(num_classes, scale=name[-1])
    else:
        net = _build_v5u(name.removesuffix("u"), num_classes)
    names = class_names or [f"class{i}" for i in range(num_classes)]
    net.names = dict(enumerate(names))
    return net


def _build_v5u(yaml_name: str, num_classes: int) -> nn.Module:
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel("WARNING")  # "Overriding model.yaml nc=80 with nc=20" is expected, not news
    try:
        net = DetectionModel(f"{yaml_name}.yaml", nc=num_classes, verbose=False)
    finally:
        LOGGER.setLevel(level)
    # The loss gains ultralytics' trainer would attach (box 7.5, cls 0.5, dfl 1.5 by default).
    net.args = SimpleNamespace(**DEFAULT_GAINS["v5u"])
    return net


def build_criterion(net: nn.Module, gains: dict[str, float | None], anchor_t: float = ANCHOR_T):
    """The family's loss; `gains` overrides its defaults where not None (obj: anchor-based only, dfl: v5u only)."""
    family = "anchor" if is_anchor_based(net) else "v5u"
    chosen = {k: (v if gains.get(k) is None else gains[k]) for k, v in DEFAULT_GAINS[family].items()}
    if family == "anchor":
        return AnchorYOLOLoss(net.detect, anchor_t=anchor_t, **chosen)
    from ultralytics.utils.loss import v8DetectionLoss

    net.args = SimpleNamespace(**chosen)
    return v8DetectionLoss(net)


def head_output_convs(net: nn.Module) -> dict[str, nn.Module]:
    """The Detect head's bare output convs by name (3 anchor-based, 6 in YOLOv5u)."""
    return {
        name: m for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d) and any(fnmatch.fnmatchcase(name, p) for p in HEAD_OUTPUT_PATTERNS)
    }


def check_quantization_policy(net: nn.Module) -> None:
    """Refuse a quantized DFL conv: the training loss never uses it, so the loss would look fine while mAP
    collapses (configs/quant/yolo_*.yaml exclude it)."""
    if not applied_spec(net).quantized:
        return
    quantized = [
        n for n, m in net.named_modules() if isinstance(m, QuantConv2d) and fnmatch.fnmatchcase(n, DFL_CONV_PATTERN)
    ]
    if quantized:
        raise QuantSpecError(
            f"the DFL conv ({quantized[0]}) must stay in float: add exclude: ['{DFL_CONV_PATTERN}'] to the "
            "quantization section (see configs/quant/yolo_lsq4.yaml)"
        )


def _state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.float().state_dict()
    if isinstance(obj, dict):
        for key in ("ema", "model"):  # an ultralytics .pt: {"model": DetectionModel, "ema": ..., ...}
            if isinstance(obj.get(key), nn.Module):
                return obj[key].float().state_dict()
        if isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint of this module
            state = obj["state_dict"]
            prefix = "ema_net." if any(k.startswith("ema_net.") for k in state) else "net."
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise DataError(f"{path} holds no model weights (expected an ultralytics .pt, a qreg checkpoint or a state_dict)")


def load_pretrained(net: nn.Module, path: str) -> tuple[int, int]:
    """Copy every tensor of a local weights file whose name and shape match; returns (copied, total).

    Only a local file the user names is read: nothing is downloaded. Tensors of another shape (a head for
    another number of classes) are left as initialised.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {file} (give a local file; qreg never downloads weights)"
        )
    import_ultralytics()  # an ultralytics .pt unpickles ultralytics classes
    try:
        obj = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # any unpickling failure means the same to the user
        raise DataError(f"cannot read pretrained weights {file}: {error}") from None
    state = _state_dict_of(obj, file)
    own = net.state_dict()
    matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not matched:
        raise DataError(f"no tensor of {file} matches {type(net).__name__} (is it a YOLOv5 model of the same family?)")
    net.load_state_dict(matched, strict=False)
    return len(matched), len(own)
