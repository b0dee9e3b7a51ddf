"""Stop a run whose loss stops being finite, naming where it went bad, without a host sync per step.

Training losses are checked as below; validation and test losses once per evaluation (`check_finite_evaluation`):
a network can train on finite batch-statistics losses while its running statistics, used in evaluation, are
already NaN, and such a run must end as diverged, not store NaN as its result.

Reading the loss on the host every step (`bool(torch.isfinite(loss))`) stalls a GPU's launch queue. Instead
each step records on the device, with no read-back, the first step whose loss was not finite and that loss;
the host reads the record once per `trainer.log_every_n_steps` and at the end of every epoch (and of
`max_steps`), so a diverged run still stops within a few steps, naming the exact step it diverged at.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; a study records the cell as diverged and goes on."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # the first step whose loss was not finite


def first_non_finite(net: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN/inf; quantizer state (steps, alphas) comes first."""
    named = list(net.named_parameters()) + list(net.named_buffers())
    named.sort(key=lambda item: not any(k in item[0] for k in ("quantizer", "step", "alpha")))
    for name, tensor in named:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


class DivergenceRecord:
    """The first non-finite loss of a run, kept on the loss's device: its step (-1: none yet) and value."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` if this is the first non-finite loss; device ops only (the step is a kernel argument)."""
        first = ~torch.isfinite(loss.detach()) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.detach().float(), self.loss)

    def read(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None: the one host sync."""
        step = int(self.step.item())
        return None if step < 0 else (step, float(self.loss.item()))


def is_check_step(trainer, step: int) -> bool:
    """Whether the host reads the record at this training step: a logging step, an epoch's last batch, the last step."""
    every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    last_of_epoch = progress.ready >= trainer.num_training_batches
    last_step = 0 < trainer.max_steps <= step + 1
    return (step + 1) % every == 0 or last_of_epoch or last_step


def check_finite_loss(module, loss: torch.Tensor) -> None:
    """Record a non-finite loss on the device; on check steps, raise TrainingDiverged if one was recorded."""
    record = getattr(module, "_divergence_record", None)
    if record is None or record.step.device != loss.device:
        record = module._divergence_record = DivergenceRecord(loss.device)
    step = module.global_step
    record.update(loss, step)
    if not is_check_step(module.trainer, step):
        return
    diverged = record.read()
    if diverged is None:
        return
    first_step, value = diverged
    when = "" if first_step == step else f" at step {step}, when checked"
    raise TrainingDiverged(
        f"training diverged at step {first_step} (epoch {module.current_epoch}): loss is {value}; "
        f"{_culprit(module, when)}; lower the learning rate or raise the bit width",
        step=first_step,
    )


def _culprit(module, when: str = "") -> str:
    culprit = first_non_finite(module.net)
    return (f"first non-finite tensor{when}: {culprit}" if culprit
            else "every parameter and buffer is finite, so the forward pass itself overflowed")


def check_finite_evaluation(module, values: dict[str, float], stage: str) -> None:
    """Raise TrainingDiverged when an evaluation's loss (or any logged value) is not finite; `values` are the
    epoch's reduced numbers by name (one host read per evaluation, not per batch)."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if not bad:
        return
    shown = ", ".join(f"{name} {value}" for name, value in list(bad.items())[:3])
    raise TrainingDiverged(
        f"{stage} diverged after epoch {module.current_epoch} (step {module.global_step}): {shown}; "
        f"{_culprit(module)}; lower the learning rate or raise the bit width",
        step=module.global_step,
    )
