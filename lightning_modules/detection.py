"""`DetectionModule`: YOLOv5n (ultralytics' YOLOv5u) trained with ultralytics' loss and recipe, scored by mAP.

The network is `ultralytics.nn.tasks.DetectionModel("yolov5n.yaml")`. In ultralytics >= 8.1 that YAML builds
**YOLOv5u**: the YOLOv5 backbone and neck with the anchor-free, decoupled YOLOv8 head (DFL box decoding),
2.51 M parameters with 20 classes, not the anchor-based YOLOv5n (1.79 M) of the paper. See docs/detection.md.

Like `ClassificationModule`, quantization is not configured here: `QuantizationCallback` swaps layers in
`self.net` during `setup` (configs/quant/yolo_*.yaml hold the YOLO policy: DFL conv excluded, head output convs
at 8 bits or float, signed LSQ activations), and `on_load_checkpoint` re-applies a checkpoint's spec, so
`load_from_checkpoint` and `test --ckpt_path` rebuild the fake-quant layers before the weights load.

Training follows ultralytics' detection recipe: loss summed over the images of a batch (box 7.5, cls 0.5,
dfl 1.5), SGD with Nesterov momentum 0.937, lr 0.01 decaying linearly to lr * lrf, 3 warm-up epochs (bias lr
from 0.1, momentum from 0.8), weight decay 5e-4 scaled by batch / 64 on conv weights only, gradient norm
clipped at 10, and an EMA of the weights used for validation and test.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from lightning_modules.divergence import check_finite_loss
from lightning_modules.evaluation import test_split_names
from lightning_modules.task import TaskModule
from lightning_modules.yolo import (
    ModelEMA,
    build_yolo,
    check_quantization_policy,
    load_pretrained,
    non_max_suppression,
    to_original_coordinates,
)
from quantizers import parameter_groups, quantize_model
from records.measures import corruption_means, detection_summary

_EMA_PREFIX = "ema_net."
_NET_PREFIX = "net."


class DetectionModule(TaskModule):
    """Object detector with per-epoch train/val loss, val mAP50, and per-split test mAP50 / mAP50-95.

    Args:
        model: yolov5n (or another YOLOv5 scale; ultralytics builds the anchor-free v5u variant).
        num_classes: set from the DataModule by the CLI.
        pretrained: a local weights file (ultralytics .pt, qreg checkpoint or state_dict) whose tensors of
            matching name and shape are copied in before the quantization swap; never downloaded. None trains
            from scratch. (It is read again whenever the module is built, also by `load_from_checkpoint`,
            whose weights then replace it: pass `pretrained=None` there if the file is gone.)
        optimizer: sgd (ultralytics' choice for long runs) or adamw.
        lr, lrf, momentum: initial learning rate, final lr as a fraction of it (linear decay over
            trainer.max_epochs), SGD momentum (AdamW beta1).
        weight_decay: on conv/linear weights only (not BatchNorm, biases or quantizer parameters), scaled by
            batch_size * accumulate_grad_batches / nominal_batch_size as ultralytics does.
        nominal_batch_size: the batch ultralytics' hyper-parameters are tuned for (64).
        warmup_epochs, warmup_min_steps, warmup_momentum, warmup_bias_lr: linear warm-up over
            max(warmup_epochs epochs, warmup_min_steps steps) (0 epochs disables it).
        box, cls, dfl: loss gains.
        max_grad_norm: gradient-norm clipping (None disables it).
        ema, ema_decay, ema_tau: validate and test an exponential moving average of the weights.
        conf_threshold, iou_threshold, max_det: NMS settings of ultralytics' validation (multi-label);
            max_det is also the detections per image that mAP scores.
        bn_momentum: override BatchNorm momentum (ultralytics uses 0.03; 0.1 learns tiny sets faster).
    """

    def __init__(
        self,
        model: str = "yolov5n",
        num_classes: int = 20,
        pretrained: str | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        lrf: float = 0.01,
        momentum: float = 0.937,
        weight_decay: float = 5e-4,
        nominal_batch_size: int = 64,
        warmup_epochs: float = 3.0,
        warmup_min_steps: int = 100,
        warmup_momentum: float = 0.8,
        warmup_bias_lr: float = 0.1,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        max_grad_norm: float | None = 10.0,
        ema: bool = True,
        ema_decay: float = 0.9999,
        ema_tau: float = 2000.0,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.7,
        max_det: int = 100,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_yolo(model, num_classes)
        self.net.args.box, self.net.args.cls, self.net.args.dfl = box, cls, dfl
        if bn_momentum is not None:
            for module in self.net.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = bn_momentum
        if pretrained:
            copied, total = load_pretrained(self.net, pretrained)
            rank_zero_info(f"pretrained: {copied} of {total} tensors from {pretrained}")
        self.ema_net: nn.Module | None = None
        self._ema: ModelEMA | None = None
        self._ema_step = -1
        self._criterion = None
        self.val_map = self._new_map()
        self.test_map = self._new_map()
        self._test_split: int | None = None

    # ------------------------------------------------------------------------------------------ building

    def _new_map(self) -> MeanAveragePrecision:
        # COCO evaluation (101-point interpolated AP) through faster_coco_eval: identical to pycocotools.
        return MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend="faster_coco_eval",
            max_detection_thresholds=[1, 10, self.hparams.max_det],
        )

    @property
    def criterion(self):
        # v8DetectionLoss stores the device it was built on: build it lazily, on the model's device.
        if self._criterion is None or self._criterion.device != self.device:
            from ultralytics.utils.loss import v8DetectionLoss

            self._criterion = v8DetectionLoss(self.net)
        return self._criterion

    @property
    def eval_net(self) -> nn.Module:
        """The weights validation and test use: the EMA when enabled."""
        return self.ema_net if self.ema_net is not None else self.net

    def _create_ema(self) -> None:
        self.ema_net = ModelEMA.copy_of(self.net)
        # Same mode as the live network (Lightning warns about modules left in eval mode at fit start);
        # `_predict` puts it in eval mode whenever it is used.
        self.ema_net.train(self.net.training)
        self._ema = ModelEMA(self.ema_net, self.hparams.ema_decay, self.hparams.ema_tau)

    def setup(self, stage: str) -> None:
        # Runs after QuantizationCallback.setup (callbacks first): the swap is done, check it.
        check_quantization_policy(self.net)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if names and len(names) == self.hparams.num_classes:
            self.net.names = dict(enumerate(names))

    def configure_model(self) -> None:
        # After the quantization swap and before the checkpoint restore and the optimizer: the EMA copies
        # the quantized network, so its state_dict keys match a quantized checkpoint's.
        if self.hparams.ema and self.ema_net is None:
            self._create_ema()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = self.requantize(checkpoint)  # the net only: the EMA copy is rebuilt below
        if spec is not None:
            check_quantization_policy(self.net)
        state = checkpoint.get("state_dict", {})
        if not self.hparams.ema:
            for key in [k for k in state if k.startswith(_EMA_PREFIX)]:
                del state[key]
            return
        if self.ema_net is None:
            self._create_ema()
        elif spec is not None:
            quantize_model(self.ema_net, spec)
        if not any(k.startswith(_EMA_PREFIX) for k in state):  # trained without EMA: start it from the weights
            for key in [k for k in state if k.startswith(_NET_PREFIX)]:
                state[_EMA_PREFIX + key[len(_NET_PREFIX):]] = state[key]
        self._ema.updates = int(checkpoint.get("ema_updates", checkpoint.get("global_step", 0)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema_updates"] = self._ema.updates if self._ema is not None else 0

    # ------------------------------------------------------------------------------------------ training

    @staticmethod
    def _images(batch: dict[str, Any]) -> torch.Tensor:
        images = batch["img"]
        return images.float() / 255.0 if images.dtype == torch.uint8 else images

    def forward(self, images: torch.Tensor):
        return self.net(images)

    def _loss(self, raw, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.criterion(raw, batch)
        return loss, items

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = self._images(batch)
        loss, items = self._loss(self.net(images), batch)
        # ultralytics backpropagates the batch's summed loss and accumulates without averaging; Lightning
        # divides by accumulate_grad_batches, so undo that.
        total = loss.sum() * self.trainer.accumulate_grad_batches
        check_finite_loss(self, total)
        size = images.shape[0]
        self.log("train/loss", sum(items.values()), on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in items.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=size)
        return total

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._schedule(batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._ema is not None and self.global_step != self._ema_step:  # after each optimizer step
            self._ema_step = self.global_step
            self._ema.update(self.net)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None and self.hparams.max_grad_norm:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.max_grad_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _lr_factor(self, epoch: float) -> float:
        epochs = self.trainer.max_epochs
        if not epochs or epochs < 1:  # no fixed length (max_epochs -1): no decay
            return 1.0
        return (1 - min(epoch, epochs) / epochs) * (1.0 - self.hparams.lrf) + self.hparams.lrf

    def _schedule(self, batch_idx: int) -> None:
        """ultralytics' schedule: linear lr decay per epoch, and a linear warm-up per step."""
        hp = self.hparams
        optimizer = self.optimizers(use_pl_optimizer=False)
        batches = max(1, self.trainer.num_training_batches)
        step = batch_idx + batches * self.current_epoch
        warmup = max(round(hp.warmup_epochs * batches), hp.warmup_min_steps) if hp.warmup_epochs > 0 else 0
        target = hp.lr * self._lr_factor(self.current_epoch)
        for group in optimizer.param_groups:
            lr, momentum = target, hp.momentum
            if step < warmup:
                start = hp.warmup_bias_lr if group.get("name") == "biases" else 0.0
                lr = start + (target - start) * step / warmup
                momentum = hp.warmup_momentum + (hp.momentum - hp.warmup_momentum) * step / warmup
            group["lr"] = lr
            if "momentum" in group:
                group["momentum"] = momentum
            elif "betas" in group:
                group["betas"] = (momentum, group["betas"][1])

    def configure_optimizers(self):
        hp = self.hparams
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", hp.nominal_batch_size)
        accumulate = self.trainer.accumulate_grad_batches
        weight_decay = hp.weight_decay * batch_size * accumulate / hp.nominal_batch_size
        groups = parameter_groups(self.net, weight_decay)
        # Split the network's group as ultralytics does: decay on weights only; biases warm up from their
        # own learning rate. LSQ steps / PACT alphas keep the groups (and decay) the quantization spec gives.
        network = {id(p) for p in groups[0]["params"]}
        weights, norms, biases = [], [], []
        for module in self.net.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if id(parameter) not in network or not parameter.requires_grad:
                    continue
                if name == "bias":
                    biases.append(parameter)
                elif isinstance(module, nn.modules.batchnorm._BatchNorm) or parameter.ndim <= 1:
                    norms.append(parameter)
                else:
                    weights.append(parameter)
        split = [
            {"params": weights, "weight_decay": weight_decay, "name": "weights"},
            {"params": norms, "weight_decay": 0.0, "name": "norms"},
            {"params": biases, "weight_decay": 0.0, "name": "biases"},
        ]
        groups = [g for g in split if g["params"]] + groups[1:]
        if hp.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        return torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.momentum, 0.999))

    # ------------------------------------------------------------------------------------------ evaluation

    def _predict(self, batch) -> tuple[Any, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        """Eval-mode outputs, detections in native-image pixels, and the matching ground truth."""
        net = self.eval_net
        net.eval()
        decoded, raw = net(self._images(batch))
        hp = self.hparams
        detections = non_max_suppression(decoded, hp.conf_threshold, hp.iou_threshold, hp.max_det)
        predictions, targets = [], []
        for i, found in enumerate(detections):
            boxes = to_original_coordinates(found[:, :4], batch["ratio_pad"][i], batch["ori_shape"][i])
            predictions.append({"boxes": boxes, "scores": found[:, 4], "labels": found[:, 5].long()})
            # VOC "difficult" objects: COCO's iscrowd, so detections on them are neither hits nor misses.
            targets.append({"boxes": batch["ori_boxes"][i].float(), "labels": batch["ori_cls"][i].long(),
                            "iscrowd": batch["difficult"][i].long()})
        return raw, predictions, targets

    def validation_step(self, batch, batch_idx: int) -> None:
        if not len(batch["index"]):  # every image of the batch was skipped (on_bad_image: skip)
            return
        raw, predictions, targets = self._predict(batch)
        # The paper's Figure 1 curve: the validation objective, computed in eval mode (BatchNorm running
        # statistics, EMA weights), on the same scale as train/loss.
        _, items = self._loss(raw, batch)
        size = len(predictions)
        self.log("val/loss", sum(items.values()), on_epoch=True, prog_bar=True, batch_size=size)
        for name, value in items.items():
            self.log(f"val/{name}", value, on_epoch=True, batch_size=size)
        self.val_map.update(predictions, targets)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_map.compute()
        self.val_map.reset()
        self.log("val/map50", 100.0 * scores["map_50"].item(), prog_bar=True)
        self.log("val/map50_95", 100.0 * scores["map"].item())

    def on_test_epoch_start(self) -> None:
        self.test_results = {}
        self._test_split = None
        self.test_map.reset()

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning runs the test dataloaders one after another: score a split as soon as the next begins,
        # so only one split's detections are held at a time (96 splits x 4,952 images would not fit).
        if self._test_split is not None and dataloader_idx != self._test_split:
            self._finish_test_split()
        self._test_split = dataloader_idx
        if not len(batch["index"]):  # every image of the batch was skipped (on_bad_image: skip)
            return
        _, predictions, targets = self._predict(batch)
        self.test_map.update(predictions, targets)

    def _finish_test_split(self) -> None:
        scores = self.test_map.compute()
        self.test_map.reset()
        name = test_split_names(self.trainer)[self._test_split]
        # Percent, like classification accuracy (the report's unit).
        self.test_results[name] = {"map50": 100.0 * scores["map_50"].item(), "map50_95": 100.0 * scores["map"].item()}

    def on_test_epoch_end(self) -> None:
        if self._test_split is not None:
            self._finish_test_split()
            self._test_split = None
        for name, metrics in self.test_results.items():
            self.log(f"test/map50/{name}", metrics["map50"], add_dataloader_idx=False)
            self.log(f"test/map50_95/{name}", metrics["map50_95"], add_dataloader_idx=False)
        map50 = {name: metrics["map50"] for name, metrics in self.test_results.items()}
        for corruption, mean in corruption_means(map50).items():
            self.log(f"test/map50_mean/{corruption}", mean, add_dataloader_idx=False)
        for key, value in detection_summary(map50).items():
            if math.isfinite(value):
                self.log(f"test/{key}", value, add_dataloader_idx=False)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, torch.Tensor]]:
        """Detections per image: boxes (x1, y1, x2, y2 in native pixels), scores and labels."""
        if not len(batch["index"]):
            return []
        _, predictions, _ = self._predict(batch)
        return predictions
