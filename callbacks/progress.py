"""`SplitsProgressBar`: Lightning's rich progress bar, with one bar across every test split.

Testing on the clean set and 19 x 5 corrupted copies is 96 dataloaders; Lightning's bar starts afresh for
each, so nobody can tell how far the test is or how long it will take. Here the test bar counts the batches
of all splits together, names the split being tested (`fog/3, split 42/96`) and estimates the time left.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import TimeRemainingColumn


class SplitsProgressBar(RichProgressBar):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._split_offsets: list[float] = []

    def configure_columns(self, trainer) -> list:
        return [*super().configure_columns(trainer), TimeRemainingColumn(elapsed_when_finished=True)]

    def on_test_start(self, trainer, pl_module) -> None:
        super().on_test_start(trainer, pl_module)
        counts = [c if math.isfinite(c) else 0 for c in trainer.num_test_batches]
        self._split_offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]

    def _split_description(self, trainer, dataloader_idx: int) -> str:
        names = getattr(getattr(trainer, "datamodule", None), "test_split_names", None) or []
        total = len(self._split_offsets) - 1
        name = names[dataloader_idx] if dataloader_idx < len(names) else f"dataloader {dataloader_idx}"
        return f"{self.test_description} {name} (split {dataloader_idx + 1}/{total})"

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.is_disabled or not self.has_dataloader_changed(dataloader_idx):
            return
        description = self._split_description(trainer, dataloader_idx)
        if self.test_progress_bar_id is None:
            self.test_progress_bar_id = self._add_task(self._split_offsets[-1], description)
        else:
            self.progress.update(self.test_progress_bar_id, description=description)
        self.refresh()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.is_disabled or self.test_progress_bar_id is None:
            return
        self._update(self.test_progress_bar_id, self._split_offsets[dataloader_idx] + batch_idx + 1)
