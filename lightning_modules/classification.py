"""`ClassificationModule`: cross-entropy training of a named 32x32 model, with the paper's SGD recipe.

Quantization is not configured here: `QuantizationCallback` swaps layers in `self.net` during `setup`, and the
`TaskModule` base re-applies the spec stored in a checkpoint (lightning_modules/task.py, with the contract the
callbacks rely on).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.divergence import check_finite_evaluation, check_finite_loss
from lightning_modules.evaluation import test_split_names
from lightning_modules.models import build_model
from lightning_modules.rng import RNG_KEY, restore_rng_states, rng_states
from lightning_modules.task import TaskModule
from quantizers import parameter_groups
from quantizers.compiling import compile_after_initialization
from records.measures import CHANCE_METRIC, IMAGES_METRIC, corruption_means
from records.splits import CLEAN


class ClassificationModule(TaskModule):
    """Image classifier with per-epoch train/val loss and accuracy, and per-split test metrics.

    Args:
        model: resnet20, resnet18, resnet50 or mobilenetv1 (32x32 variants).
        num_classes: set from the DataModule by the CLI.
        lr, momentum, weight_decay, gamma: SGD + MultiStepLR, the paper's recipe (section 4.1.1);
            quantizer parameters get their own weight decay (see QuantSpec).
        milestones: epochs at which the learning rate is multiplied by gamma, as fractions of
            `trainer.max_epochs` (values >= 1 are absolute epochs). The default is the paper's 50/90/130/180
            of 200 epochs, so a shorter schedule keeps the same shape.
        compile: torch.compile the network (after the quantization swap): slower start, faster steps. The
            first training batch runs eagerly to initialise the quantizers; the compiled graph takes over after.
        channels_last: keep the network's weights and inputs in channels_last memory format (faster
            convolutions on tensor-core GPUs; fake quantization preserves the format).
    """

    def __init__(
        self,
        model: str = "resnet20",
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        milestones: tuple[float, ...] = (0.25, 0.45, 0.65, 0.9),
        gamma: float = 0.2,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(model, num_classes)
        # Epoch accumulators of the training metrics live in the checkpoint (persistent), so a run resumed in the
        # middle of an epoch reports the same epoch loss and accuracy as an uninterrupted one.
        # No host reads in the training step: no input validation or NaN check on the device (the divergence
        # check owns non-finite losses), micro accuracy (no bincount, which syncs on CUDA).
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.train_loss.persistent(True)
        self.train_acc.persistent(True)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = nn.ModuleList()
        self.test_loss = nn.ModuleList()
        self._correct: list[list[torch.Tensor]] = []
        self._compiled = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)  # a no-op when it already is
        return self.net(images)

    def configure_model(self) -> None:
        # Runs after the callbacks' setup (the quantization swap) and before the optimizer exists.
        if self.hparams.get("channels_last"):
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            compile_after_initialization(self.net)
            self._compiled = True
            if self._trainer is not None:
                # Fit's validation runs under no_grad; test under inference_mode would be one more graph
                # (inference tensors guard differently), so every evaluation shares the validation graph.
                for loop in (self.trainer.validate_loop, self.trainer.test_loop, self.trainer.predict_loop):
                    loop.inference_mode = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.requantize(checkpoint)
        if RNG_KEY in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            restore_rng_states(checkpoint[RNG_KEY])

    def on_train_epoch_start(self) -> None:
        # The persistent epoch accumulators come back from any checkpoint; keep them only when resuming in the
        # middle of an epoch (an end-of-epoch checkpoint holds the finished epoch's totals).
        completed = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if not 0 < completed < self.trainer.num_training_batches:
            self.train_loss.reset()
            self.train_acc.reset()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        check_finite_loss(self, loss)
        # update(), not __call__: the batch value would be computed and thrown away (only epoch values are logged)
        self.train_acc.update(logits, labels)
        self.train_loss.update(loss.detach(), weight=torch.full_like(loss.detach(), len(labels)))  # no host copy
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc.update(logits, labels)
        # sync_dist: under DDP the epoch's loss is the mean over every rank's images, not rank 0's share
        self.log("val/loss", F.cross_entropy(logits, labels), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        names = test_split_names(self.trainer)
        n = len(names)
        num_classes = self.hparams.num_classes
        # No per-batch input validation or NaN check (each a host sync on CUDA): a NaN loss stays in the mean.
        self.test_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(n))
        self.test_loss = nn.ModuleList(MeanMetric(nan_strategy="disable") for _ in range(n))
        self.test_acc.to(self.device)
        self.test_loss.to(self.device)
        self._correct: list[list[torch.Tensor]] = [[] for _ in range(n)]
        # Images per class of the clean split, on the device (index_add_, no host sync): the chance level a
        # classifier that ignores its input reaches is the largest class's share.
        self._clean_index = names.index(CLEAN) if CLEAN in names else None
        self._label_counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc[dataloader_idx].update(logits, labels)
        self.test_loss[dataloader_idx].update(F.cross_entropy(logits, labels, reduction="none"))
        if dataloader_idx == self._clean_index:
            self._label_counts.index_add_(0, labels, torch.ones_like(labels))
        # Per-image correctness, for the report's paired bootstrap, kept on the device until the split ends.
        # Under DDP the sampler pads and interleaves the images, so the order is only kept on one process.
        if self.trainer.world_size == 1:
            self._correct[dataloader_idx].append(logits.argmax(1) == labels)

    def on_test_epoch_end(self) -> None:
        names = test_split_names(self.trainer)
        self.test_predictions = {
            name: torch.cat(chunks).cpu().numpy() for name, chunks in zip(names, self._correct, strict=True) if chunks
        }
        self.test_results = {}
        counts = self.trainer.strategy.reduce(self._label_counts, reduce_op="sum")  # every rank's clean images
        for index, (name, acc, loss) in enumerate(zip(names, self.test_acc, self.test_loss, strict=True)):
            # Accuracy in percent, the unit of the paper's tables and of its Eq. 5.
            self.test_results[name] = {"accuracy": 100.0 * acc.compute().item(), "loss": loss.compute().item()}
            if index == self._clean_index:
                images = int(counts.sum())
                self.test_results[name].update({IMAGES_METRIC: float(images),
                                                CHANCE_METRIC: 100.0 * int(counts.max()) / max(images, 1)})
            acc.reset()
            loss.reset()
        check_finite_evaluation(self, {f"test/loss/{name}": m["loss"] for name, m in self.test_results.items()}, "test")
        # The torchmetrics above are already reduced over ranks: every rank logs the same values (sync_dist=True
        # tells Lightning so, which otherwise warns once per split).
        for name, metrics in self.test_results.items():
            self.log(f"test/acc/{name}", metrics["accuracy"], add_dataloader_idx=False, sync_dist=True)
            self.log(f"test/loss/{name}", metrics["loss"], add_dataloader_idx=False, sync_dist=True)
        accuracy = {name: metrics["accuracy"] for name, metrics in self.test_results.items()}
        for corruption, mean in corruption_means(accuracy).items():
            self.log(f"test/acc_mean/{corruption}", mean, add_dataloader_idx=False, sync_dist=True)

    def milestone_epochs(self) -> list[int]:
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        epochs = []
        for m in self.hparams.milestones:
            if m >= 1:
                epochs.append(int(m))
            elif max_epochs and max_epochs > 0:
                epochs.append(round(m * max_epochs))
        return sorted(set(epochs))

    def configure_optimizers(self):
        groups = parameter_groups(self.net, self.hparams.weight_decay, self.hparams.lr)
        optimizer = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=self.hparams.momentum)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=self.milestone_epochs(), gamma=self.hparams.gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
