"""The timed training step the benchmarks share: subclasses say how to compute the loss; `ClassifierStep` is
the classifier's (the fake-quant overhead, device throughput and loader benchmarks time the same step)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.models import build_model
from quantizers import QuantSpec, parameter_groups, prepare, quantize_model
from quantizers.compiling import compile_after_initialization


def classifier_images(batch_size: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """Random 32x32 images in the memory layout the classification DataModules deliver: their uint8 arrays are
    NHWC, batches are NCHW views of them (channels_last strides), and the network runs on that layout."""
    return torch.randn(batch_size, 32, 32, 3, generator=generator).permute(0, 3, 1, 2).to(device)


class TimedTrainingStep:
    """One optimizer step on a fixed batch, and the mean seconds per step over several."""

    optimizer: torch.optim.Optimizer
    device: str

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
        if self.device == "cuda":
            torch.cuda.synchronize()  # time the work, not its launch

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


class ClassifierStep(TimedTrainingStep):
    """A quantized classifier, its SGD optimizer (the CIFAR recipe's groups) and a fixed batch. `compile_as`: None
    (eager), "cli" (the way `compile: true` does it: quantize, compile, train, the first batch running eagerly) or
    "library" (the way a user of the quantizers package does: quantize, `quantizers.prepare` on the batch,
    `torch.compile`, train); `bf16` runs the forward under autocast. The warm-up steps (compilation, the
    quantizers' first-batch initialisation) are timed apart, in `warmup_seconds`."""

    def __init__(self, model_name: str, spec: QuantSpec, batch: tuple, device: str,
                 compile_as: Literal["cli", "library"] | None = None, backend: str = "inductor", bf16: bool = False,
                 warmup_steps: int = 3) -> None:
        torch.manual_seed(0)
        self.model = quantize_model(build_model(model_name, 10), spec).to(device).train()
        lr = 0.01
        self.optimizer = torch.optim.SGD(parameter_groups(self.model, 1e-4, lr=lr), lr=lr, momentum=0.9)
        self.images, self.labels = batch
        self.device, self.bf16 = device, bf16
        start = time.perf_counter()
        if compile_as == "cli":
            compile_after_initialization(self.model, backend=backend)
        elif compile_as == "library":
            self.model = torch.compile(prepare(self.model, self.images), backend=backend)
        for _ in range(warmup_steps):
            self.step()
        self.warmup_seconds = time.perf_counter() - start

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16) if self.bf16 else nullcontext():
            return F.cross_entropy(self.model(self.images), self.labels)
