"""The numbers the paper and the robustness literature report, computed one way everywhere (task modules'
logs, the per-run table, the study report).

Scores are in percent (accuracy or mAP50) and keyed by split name ('clean', '<corruption>/<severity>', see
records.splits).

- Eq. 5 of AskariHemmat et al. (2022): the relative error improvement on the mean corrupted accuracy.
- Corruption means: per corruption over its severities, and over every corrupted split.
- P / mPC / rPC (Michaelis et al. 2019): clean score, mean over the 15 benchmark corruptions, their ratio.
- Relative robustness (mean corrupted / clean): the classification analogue of rPC.
- Chance level: the accuracy bound below which a classifier is indistinguishable from one that ignores its input
  (a collapsed run, kept out of every comparison).
- mCE with FP32 as the baseline (Hendrycks & Dietterich 2019): per corruption, the model's error summed over
  severities divided by the baseline's, averaged over the 15 benchmark corruptions (theirs; the 4 extra ones
  are left out, so figures compare with the ImageNet-C literature); below 100 % means more robust.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

from records.splits import BENCHMARK_CORRUPTIONS, CLEAN, corruption_of

# The per-split score of a classification / detection run, in percent: a run with a clean row of one is tested.
SCORE_METRICS = ("accuracy", "map50")
# A run whose tested model is dead (records its clean split with value 1, and how many quantized layers sit on
# one level): the report keeps it out of every delta, Eq. 5 and robustness measure, as a diverged run.
COLLAPSED_METRIC = "collapsed"
COLLAPSED_LAYERS_METRIC = "collapsed_layers"
CHANCE_METRIC = "chance"  # the clean test set's largest class share, percent: what a dead classifier scores
IMAGES_METRIC = "images"  # clean test images the accuracy was measured on (the chance bound's n)


def error_improvement(fp_acc: float, q_acc: float) -> float:
    """The paper's Eq. 5: 100 * log10((100 - fp) / (100 - q)), accuracies in percent.

    Positive when the quantized model makes fewer errors than the FP32 one. Base 10 reproduces the paper's
    Table 1 (ResNet20/CIFAR-10: fp 82.80 vs q 79.17 / 83.94 / 84.07 gives -8.32 / 2.98 / 3.33). Undefined
    (NaN) when either accuracy is 100 % or any input is NaN: one model makes no error to compare with.
    """
    if math.isnan(fp_acc + q_acc) or fp_acc >= 100.0 or q_acc >= 100.0:
        return math.nan
    return 100.0 * math.log10((100.0 - fp_acc) / (100.0 - q_acc))


# One-sided 99 % quantile of the normal distribution: an accuracy below chance + 2.326 standard errors is not
# evidence that the model looks at its input.
CHANCE_Z = 2.326


def chance_bound(chance: float, images: int) -> float:
    """The highest clean accuracy (percent) still at chance level: `chance` (the largest class's share, what a
    constant classifier scores) plus 2.326 binomial standard errors over `images` test images."""
    p = min(max(chance / 100.0, 0.0), 1.0)
    return 100.0 * (p + CHANCE_Z * math.sqrt(p * (1.0 - p) / max(images, 1)))


def corruption_means(accuracy_by_split: Mapping[str, float]) -> dict[str, float]:
    """Per-corruption mean over severities, and 'corrupted': the mean over every corrupted split.

    Keys of the input are split names: 'clean' or '<corruption>/<severity>'.
    """
    by_corruption: dict[str, list[float]] = defaultdict(list)
    for name, value in accuracy_by_split.items():
        if name != CLEAN:
            by_corruption[corruption_of(name)].append(value)
    means = {c: sum(v) / len(v) for c, v in by_corruption.items()}
    corrupted = [v for name, v in accuracy_by_split.items() if name != CLEAN]
    if corrupted:
        means["corrupted"] = sum(corrupted) / len(corrupted)
    return means


def mean_corrupted(scores: Mapping[str, float], corruptions: tuple[str, ...] | None = None) -> float | None:
    """Mean score over every corrupted split (of the given corruptions only, if any); None without one."""
    values = [v for name, v in scores.items()
              if name != CLEAN and (corruptions is None or corruption_of(name) in corruptions)]
    return sum(values) / len(values) if values else None


def relative_robustness(scores: Mapping[str, float], corruptions: tuple[str, ...] | None = None) -> float | None:
    """100 * mean corrupted score / clean score (percent): rPC when the scores are mAP50 over the benchmark
    corruptions, 'relative robustness' for classification accuracy. None without a clean or corrupted score."""
    corrupted = mean_corrupted(scores, corruptions)
    clean = scores.get(CLEAN)
    if corrupted is None or not clean:
        return None
    return 100.0 * corrupted / clean


def detection_summary(map50_by_split: Mapping[str, float]) -> dict[str, float]:
    """P (clean mAP50), mPC (mean over the 15 benchmark corruptions' splits) and rPC = 100 * mPC / P."""
    summary = {}
    if CLEAN in map50_by_split:
        summary["P"] = map50_by_split[CLEAN]
    mpc = mean_corrupted(map50_by_split, BENCHMARK_CORRUPTIONS)
    if mpc is not None:
        summary["mPC"] = mpc
        rpc = relative_robustness(map50_by_split, BENCHMARK_CORRUPTIONS)
        if rpc is not None:
            summary["rPC"] = rpc
    return summary


def mean_corruption_error(
    scores: Mapping[str, float], baseline: Mapping[str, float], corruptions: tuple[str, ...] = BENCHMARK_CORRUPTIONS
) -> float | None:
    """mCE (percent) with `baseline` (FP32) as the reference model: for each of `corruptions` both models have,
    CE_c = sum_s (100 - acc_{c,s}) / sum_s (100 - baseline_{c,s}) over the severities both have, then the mean
    of CE_c over corruptions, times 100. 100 is the baseline's own; lower is more robust. None when no
    corruption is shared or the baseline makes no error on one of them."""
    errors: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, value in scores.items():
        if name == CLEAN or name not in baseline or corruption_of(name) not in corruptions:
            continue
        pair = errors[corruption_of(name)]
        pair[0] += 100.0 - value
        pair[1] += 100.0 - baseline[name]
    if not errors or any(base <= 0.0 for _, base in errors.values()):
        return None
    return 100.0 * sum(own / base for own, base in errors.values()) / len(errors)


def severity_means(scores: Mapping[str, float]) -> dict[int, float]:
    """Mean score over corruptions at each severity (0 = the clean set), for accuracy-against-severity plots."""
    by_severity: dict[int, list[float]] = defaultdict(list)
    for name, value in scores.items():
        by_severity[0 if name == CLEAN else int(name.partition("/")[2])].append(value)
    return {s: sum(v) / len(v) for s, v in sorted(by_severity.items())}
