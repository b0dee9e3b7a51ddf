"""`DetectionModule`: YOLOv5n trained with the YOLO recipe of the pinned ultralytics trainer, scored by mAP.

`model: yolov5n` is the paper's anchor-based YOLOv5n (YOLOv5 v7.0, 1,790,977 parameters at 20 classes), written
here with its own loss (`lightning_modules/yolo/anchor_*.py`); `model: yolov5nu` is ultralytics' anchor-free
YOLOv5u (2.51 M, v8 head and loss). See docs/detection.md.

Like `ClassificationModule`, quantization is not configured here: `QuantizationCallback` swaps layers in
`self.net` during `setup` (configs/quant/yolo_*.yaml hold the YOLO policy: head output convs at 8 bits or float,
signed LSQ activations; yolov5u_*.yaml also exclude YOLOv5u's DFL conv), and `on_load_checkpoint` re-applies a
checkpoint's spec, so `load_from_checkpoint` and `test --ckpt_path` rebuild the fake-quant layers before the
weights load.

Training follows ultralytics 8.4.190's detection recipe (which YOLOv5 v7.0's train.py shares): loss summed over
the images of a batch, gradients accumulated to the nominal batch of 64, SGD with Nesterov momentum 0.937, lr
0.01 decaying linearly to lr * lrf, 3 warm-up epochs (capped at epochs - 1; bias lr from 0.1, momentum from
0.8), weight decay 5e-4 x batch x accumulation / 64 on conv weights only, gradient norm clipped at 10, and an
EMA of the weights used for validation and test.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from lightning_modules.divergence import check_finite_loss
from lightning_modules.evaluation import test_split_names
from lightning_modules.task import TaskModule
from lightning_modules.yolo import (
    ModelEMA,
    build_criterion,
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


def map_percent(scores: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """mAP50 and mAP50-95 in percent (like classification accuracy, the report's unit); None where COCO
    evaluation found no ground truth and returned its -1 "undefined" sentinel, which is not a score."""
    map50, map50_95 = scores["map_50"].item(), scores["map"].item()
    if map50 < 0 or map50_95 < 0:
        return None
    return {"map50": 100.0 * map50, "map50_95": 100.0 * map50_95}


class DetectionModule(TaskModule):
    """Object detector with per-epoch train/val loss, val mAP50, and per-split test mAP50 / mAP50-95.

    Args:
        model: yolov5n (or s/m/l/x): the anchor-based YOLOv5 v7.0 of the paper; yolov5nu (or su/mu/lu/xu):
            ultralytics' anchor-free YOLOv5u.
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
        nominal_batch_size: the batch the hyper-parameters are tuned for (64).
        accumulate_to_nominal: when trainer.accumulate_grad_batches is 1, accumulate gradients over
            round(nominal_batch_size / (batch_size x devices)) batches, as ultralytics does (at least 1, at most
            the run's batches); false steps every batch.
        warmup_epochs, warmup_momentum, warmup_bias_lr: linear warm-up over min(warmup_epochs, max_epochs - 1)
            epochs, counted in batches, as ultralytics 8.4.190 (0 disables it).
        box, obj, cls, dfl: loss gains; null takes the model family's default (anchor-based: YOLOv5's
            hyp.scratch-low box 0.05, obj 1.0, cls 0.5, scaled by levels, classes and image size; YOLOv5u: box
            7.5, cls 0.5, dfl 1.5). obj is for the anchor-based models only, dfl for YOLOv5u only.
        anchor_t: anchor-based models: largest target/anchor side ratio an anchor learns a target at.
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
        accumulate_to_nominal: bool = True,
        warmup_epochs: float = 3.0,
        warmup_momentum: float = 0.8,
        warmup_bias_lr: float = 0.1,
        box: float | None = None,
        obj: float | None = None,
        cls: float | None = None,
        dfl: float | None = None,
        anchor_t: float = 4.0,
        max_grad_norm: float | None = 10.0,
        ema: bool = True,
        ema_decay: float = 0.9999,
        ema_tau: float = 2000.0,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.7,
        max_det: int = 300,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_yolo(model, num_classes)
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
        self._epoch_started, self._images_seen = time.perf_counter(), 0

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
        if self._criterion is None or getattr(self._criterion, "device", self.device) != self.device:
            hp = self.hparams
            gains = {"box": hp.box, "obj": hp.obj, "cls": hp.cls, "dfl": hp.dfl}
            self._criterion = build_criterion(self.net, gains, hp.anchor_t)
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
            # The progress bar's running view (box / obj / cls, or box / cls / dfl); not sent to the loggers.
            self.log(name.removesuffix("_loss"), value, on_step=True, on_epoch=False, prog_bar=True, logger=False,
                     batch_size=size)
        self._images_seen += size
        elapsed = time.perf_counter() - self._epoch_started
        if elapsed > 0:
            self.log("img/s", self._images_seen / elapsed, on_step=True, on_epoch=False, prog_bar=True, logger=False,
                     batch_size=size)
        return total

    def on_train_epoch_start(self) -> None:
        self._epoch_started, self._images_seen = time.perf_counter(), 0
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):  # e.g. mosaic switched off for the last epochs
            datamodule.set_epoch(self.current_epoch, self.trainer.max_epochs)

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

    def _warmup_batches(self, batches: int) -> int:
        """ultralytics 8.4.190: warmup_epochs of batches, leaving at least the last epoch at the scheduled lr."""
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        warmup_epochs = self.hparams.warmup_epochs
        if epochs is not None:
            warmup_epochs = min(warmup_epochs, max(epochs - 1, 0))
        return round(warmup_epochs * batches) if warmup_epochs > 0 else 0

    def _schedule(self, batch_idx: int) -> None:
        """ultralytics' schedule: linear lr decay per epoch, and a linear warm-up per batch up to batch `warmup`
        inclusive (which lands exactly on the scheduled lr and momentum)."""
        hp = self.hparams
        optimizer = self.optimizers(use_pl_optimizer=False)
        batches = max(1, self.trainer.num_training_batches)
        step = batch_idx + batches * self.current_epoch
        warmup = self._warmup_batches(batches)
        target = hp.lr * self._lr_factor(self.current_epoch)
        for group in optimizer.param_groups:
            lr, momentum = target, hp.momentum
            if warmup and step <= warmup:
                start = hp.warmup_bias_lr if group.get("name") == "biases" else 0.0
                lr = start + (target - start) * step / warmup
                momentum = hp.warmup_momentum + (hp.momentum - hp.warmup_momentum) * step / warmup
            group["lr"] = lr * group.get("lr_scale", 1.0)  # quantizer groups train at their spec's multiple
            if "momentum" in group:
                group["momentum"] = momentum
            elif "betas" in group:
                group["betas"] = (momentum, group["betas"][1])

    def _accumulate_to_nominal(self) -> None:
        """Accumulate gradients to the nominal batch, as ultralytics does (unless the trainer already sets it)."""
        trainer = self.trainer
        if not self.hparams.accumulate_to_nominal or trainer.accumulate_grad_batches != 1:
            return
        datamodule = getattr(trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if not batch_size:
            return
        accumulate = max(round(self.hparams.nominal_batch_size / (batch_size * trainer.world_size)), 1)
        train_set = getattr(datamodule, "train_set", None)
        if train_set is not None and trainer.max_epochs and trainer.max_epochs > 0:  # never more than the run has
            batches = math.ceil(len(train_set) / (batch_size * trainer.world_size))
            accumulate = min(accumulate, max(batches * trainer.max_epochs, 1))
        if accumulate > 1:
            trainer.accumulate_grad_batches = accumulate
            rank_zero_info(f"detection: gradients accumulated over {accumulate} batches of {batch_size} x "
                           f"{trainer.world_size} device(s) (nominal batch {self.hparams.nominal_batch_size})")

    def configure_optimizers(self):
        hp = self.hparams
        self._accumulate_to_nominal()
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
        scores = map_percent(self.val_map.compute())
        self.val_map.reset()
        if scores is None:
            if not getattr(self.trainer, "sanity_checking", False):  # its first batches may be background only
                rank_zero_warn("the validation images scored have no ground-truth objects: mAP is undefined, "
                               "not logged")
            return
        self.log("val/map50", scores["map50"], prog_bar=True)
        self.log("val/map50_95", scores["map50_95"])

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
        scores = map_percent(self.test_map.compute())
        self.test_map.reset()
        name = test_split_names(self.trainer)[self._test_split]
        if scores is None:  # no row at all rather than a -100 % one
            rank_zero_warn(f"test split {name}: the images scored have no ground-truth objects, so its mAP is "
                           "undefined; no result is written for it")
            return
        self.test_results[name] = scores

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
