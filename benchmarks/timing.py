"""The timed training step the benchmarks share: subclasses say how to compute the loss."""

from __future__ import annotations

import time

import torch


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
