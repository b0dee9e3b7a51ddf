"""`FlatnessCallback`: after `test`, the generalization gap and the flatness of the solution.

On a fixed subset of the training images (no augmentation, eval mode) it measures the training loss and
accuracy of the model as tested (for the train-test gap), and, on the full-precision function of its weights
(fake quantization off, see records/mechanism.py), the mean loss increase under random weight perturbations
of relative size rho and the Hessian trace. They reach the results store as split "train" rows beside the
test rows (the same atomic append), so the report can put them next to the corruption deltas.
"""

from __future__ import annotations

import lightning as L
import torch

from datamodules.subsets import stratified_indices
from records.mechanism import fake_quantization_off, hessian_trace, loss_and_accuracy, sharpness
from records.splits import TRAIN


def training_batches(datamodule, images: int, batch_size: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`images` training images drawn class-stratified under the data's split seed (the same for every run;
    "the first ones" of a class-ordered image folder would be one class) and shuffled under it, so that every
    batch, the first one Eq. 4's term takes included, holds every class; normalised like evaluation batches,
    on `device`."""
    dataset = datamodule.train_set
    chosen = stratified_indices(dataset.labels, images, getattr(datamodule, "split_seed", 0), shuffle=True).tolist()
    batches = []
    for start in range(0, len(chosen), batch_size):
        pixels, labels = dataset.__getitems__(chosen[start:start + batch_size])
        batches.append((datamodule.normalize(pixels.to(device)), labels.to(device)))
    return batches


class FlatnessCallback(L.Callback):
    """Measures train loss/accuracy, sharpness and the Hessian trace when a classification model is tested.

    Args:
        enabled: set false to skip (it costs about as much as a few evaluation epochs of `images` images).
        images: how many training images the measures use (class-stratified, the same for every run).
        rho: relative size of the random weight perturbations of the sharpness measure.
        samples: perturbations averaged for the sharpness.
        hessian_samples: Rademacher vectors averaged for the Hessian trace.
    """

    adds_test_results = True  # writes pl_module.test_results in on_test_end: ResultsCallback must come after it

    def __init__(self, enabled: bool = True, images: int = 256, rho: float = 0.05, samples: int = 8,
                 hessian_samples: int = 4) -> None:
        super().__init__()
        self.enabled, self.images, self.rho = enabled, images, rho
        self.samples, self.hessian_samples = samples, hessian_samples

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        usable = hasattr(datamodule, "train_set") and hasattr(datamodule, "normalize")
        if not self.enabled or not usable or not trainer.is_global_zero or datamodule.train_set is None:
            return
        net = pl_module.net
        was_training = net.training
        net.eval()
        try:
            # Lightning tests under inference_mode; the Hessian needs autograd back.
            with torch.inference_mode(False), torch.enable_grad():
                batches = training_batches(datamodule, self.images, datamodule.eval_batch_size, pl_module.device)
                loss, accuracy = loss_and_accuracy(net, batches)
                with fake_quantization_off(net):
                    sharp, sharp_error = sharpness(net, batches, self.rho, self.samples)
                    trace, trace_error = hessian_trace(net, batches, self.hessian_samples)
        finally:
            net.train(was_training)
        pl_module.test_results[TRAIN] = {
            "loss": loss, "accuracy": accuracy, "sharpness": sharp, "sharpness_stderr": sharp_error,
            "hessian_trace": trace, "hessian_trace_stderr": trace_error,
        }
