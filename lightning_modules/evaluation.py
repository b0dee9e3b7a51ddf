"""What the task modules share about test evaluation."""

from __future__ import annotations

import lightning as L


def test_split_names(trainer: L.Trainer) -> list[str]:
    """The names of the test dataloaders in dataloader_idx order: the DataModule's `test_split_names`
    ("clean", "fog/3", ...) or, for loaders passed without one, "dataloader<i>"."""
    names = getattr(getattr(trainer, "datamodule", None), "test_split_names", None)
    if names:
        return list(names)
    return [f"dataloader{i}" for i in range(len(trainer.test_dataloaders))]

