"""Random-number states in checkpoints, so a resumed run draws the same augmentations and noise.

Lightning checkpoints weights, optimizer, schedulers and loop progress but not the RNGs; without them a
resumed run would crop, flip and (for the noise control) perturb differently from an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RNG_KEY = "qreg_rng_states"


def rng_states() -> dict[str, Any]:
    # numpy's legacy global state on purpose: it is what third-party code draws from. Stored as tensors and
    # numbers so the checkpoint still loads with torch.load(weights_only=True).
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))  # noqa: NPY002
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
