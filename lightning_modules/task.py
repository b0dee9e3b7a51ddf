"""`TaskModule`: the contract between a task's LightningModule and qreg's callbacks, and what every task module
does alike (re-quantizing on checkpoint load).

The contract the callbacks rely on:

- `net`: the `nn.Module` that `QuantizationCallback` quantizes, in place, in `setup` (the last hook before
  Lightning builds the optimizer and wraps the model for DDP). Everything the task trains or tests goes through
  it (a detector's EMA copy is quantized alongside: `quantized_networks`).
- `test_results`: filled by the module's `on_test_epoch_end` with split name ('clean', 'fog/3', see
  records.splits) -> {metric: value}, scores in percent. `FlatnessCallback` adds split 'train' in its
  `on_test_end`, which therefore must run before `ResultsCallback.on_test_end` writes the rows: Lightning calls
  callbacks in list order, so `FlatnessCallback` comes first (app/lightning_cli.py registers it first;
  `ResultsCallback.setup` refuses the other order).
- `test_predictions`: split name -> per-image correctness (bool array) on a single process, {} when there is
  none (DDP, detection); `ResultsCallback` writes it to predictions.npz for the report's paired bootstrap.

A checkpoint carries the quantization spec its weights were trained with (`quantizers.CHECKPOINT_KEY`);
`on_load_checkpoint` re-applies it to every network of `quantized_networks()` before the weights load, so
`load_from_checkpoint` and `test --ckpt_path` rebuild the fake-quant layers with or without the callback.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from torch import nn

from lightning_modules.divergence import check_finite_evaluation
from quantizers import CHECKPOINT_KEY, QuantSpec, quantize_model
from user_errors import UserError

# The optimizer and schedule arguments of the task modules that must be finite and >= 0: torch would refuse a
# negative one only once fit has started and written its run folder, so they are checked on the config first.
NON_NEGATIVE_OPTIONS = ("lr", "momentum", "weight_decay", "gamma", "lrf", "warmup_epochs")


class OptionError(UserError):
    """A model or trainer option outside the values qreg trains with."""


def check_optimizer_options(model: dict[str, Any] | None) -> None:
    """Refuse a negative (or non-finite) learning rate, momentum, weight decay, ... of a model config (its
    `class_path` / `init_args` mapping) before anything is built."""
    init_args = (model or {}).get("init_args") or {}
    for option in NON_NEGATIVE_OPTIONS:
        value = init_args.get(option)
        if isinstance(value, int | float) and not isinstance(value, bool) and not (0 <= value < math.inf):
            raise OptionError(f"--model.init_args.{option} must be a finite number >= 0, got {value}")


class TaskModule(L.LightningModule):
    """Base of the task modules; subclasses set `self.net` in `__init__`."""

    net: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.test_results: dict[str, dict[str, float]] = {}
        self.test_predictions: dict[str, Any] = {}

    def quantized_networks(self) -> list[nn.Module]:
        """The networks a checkpoint's quantization spec is applied to (by default `net`)."""
        return [self.net]

    def requantize(self, checkpoint: dict[str, Any]) -> QuantSpec | None:
        """Apply the checkpoint's quantization spec to `quantized_networks()`; returns the spec (None: float)."""
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            return None
        spec = QuantSpec.from_dict(stored)
        for net in self.quantized_networks():
            quantize_model(net, spec)
        return spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.requantize(checkpoint)

    def on_validation_end(self) -> None:
        # The epoch's reduced validation numbers are in callback_metrics only now (after on_validation_epoch_end).
        if self.trainer.sanity_checking:
            return
        values = {name: float(value) for name, value in self.trainer.callback_metrics.items()
                  if name.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1}
        check_finite_evaluation(self, values, "validation")
