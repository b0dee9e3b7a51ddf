"""A labelled PNG of one image under every corruption and severity: the quickest visual check of a profile."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from datamodules.corruptions._common import CorruptionError
from datamodules.corruptions.engine import corrupt
from records.splits import CORRUPTIONS, SEVERITIES


def save_corruption_grid(
    image: np.ndarray, path: str | os.PathLike[str], profile: str = "cifar", seed: int = 0
) -> Path:
    """Render `image` clean and under all 19 corruptions x 5 severities as a PNG grid, written atomically.

    Rows are corruptions, columns clean + severities 1..5. The file appears complete or not at all
    (temporary file in the same folder, then os.replace).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise CorruptionError("save_corruption_grid needs one HxWx3 uint8 image")
    rows = [
        [corrupt(image, name, severity, profile=profile, seed=seed) for severity in SEVERITIES] for name in CORRUPTIONS
    ]
    height, width = image.shape[:2]
    cell = 1.3
    aspect = height / width
    header = 0.7  # inches above the grid: the title, then the column titles
    figure = Figure(figsize=(cell * (len(SEVERITIES) + 1) + 1.6, cell * aspect * len(CORRUPTIONS) + header), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(CORRUPTIONS), len(SEVERITIES) + 1, squeeze=False)
    for r, (name, corrupted) in enumerate(zip(CORRUPTIONS, rows, strict=True)):
        for c, shown in enumerate([image, *corrupted]):
            axis = axes[r, c]
            axis.imshow(shown, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title("clean" if c == 0 else f"severity {c}", fontsize=8)
            if c == 0:
                axis.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    inches = figure.get_figheight()
    figure.suptitle(f"profile {profile!r}, seed {seed}", fontsize=9, y=1 - 0.08 / inches, va="top")
    figure.subplots_adjust(left=0.2, right=0.99, top=1 - header / inches, bottom=0.01, wspace=0.05, hspace=0.05)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".png", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
