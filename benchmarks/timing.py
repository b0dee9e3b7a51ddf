"""The timed training step the benchmarks share: subclasses say how to compute the loss."""

from __future__ import annotations

import time

import torch


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
