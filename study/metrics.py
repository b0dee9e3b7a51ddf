"""The numbers the paper reports, computed one way everywhere (module logs, report, tables)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

CLEAN = "clean"


def error_improvement(fp_acc: float, q_acc: float) -> float:
    """The paper's Eq. 5: 100 * log10((100 - fp) / (100 - q)), accuracies in percent.

    Positive when the quantized model makes fewer errors than the FP32 one. Base 10 reproduces the paper's
    Table 1 (ResNet20/CIFAR-10: fp 82.80 vs q 79.17 / 83.94 / 84.07 gives -8.32 / 2.98 / 3.33).
    """
    return 100.0 * math.log10((100.0 - fp_acc) / (100.0 - q_acc))


def corruption_means(accuracy_by_split: Mapping[str, float]) -> dict[str, float]:
    """Per-corruption mean over severities, and 'corrupted': the mean over every corrupted split.

    Keys of the input are split names: 'clean' or '<corruption>/<severity>'.
    """
    by_corruption: dict[str, list[float]] = defaultdict(list)
    for name, value in accuracy_by_split.items():
        if name != CLEAN:
            by_corruption[name.partition("/")[0]].append(value)
    means = {c: sum(v) / len(v) for c, v in by_corruption.items()}
    corrupted = [v for name, v in accuracy_by_split.items() if name != CLEAN]
    if corrupted:
        means["corrupted"] = sum(corrupted) / len(corrupted)
    return means
