"""The report's statistics: quantized-minus-FP32 deltas paired by seed with their intervals, and the robustness
measures of each cell side by side.

Pairing: a quantized run is compared with the FP32 run of the same seed (same data order, same initial weights);
a quantized run with no such FP32 run is *unpaired* and left out of every delta (the report lists it).
Intervals: with >= 2 pairs, the mean and 95 % Student-t interval over seeds; with one pair, a paired bootstrap
over test images of that very pair (the same images resampled for both models), which covers test-image
sampling only, not training randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from records.measures import error_improvement, mean_corruption_error, relative_robustness
from records.splits import CLEAN, corruption_of
from study.report.loading import CellResult, Study

BOOTSTRAP_SAMPLES = 1000


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def paired_bootstrap(quantized: np.ndarray, baseline: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the accuracy difference (percentage points), resampling images.

    Both arrays are per-image correctness of shape (splits, images) on the *same* images; each bootstrap
    sample draws image indices once and uses them for both models and every split.
    """
    difference = (quantized.astype(np.float32) - baseline.astype(np.float32)).mean(axis=0) * 100.0
    rng = np.random.default_rng(seed)
    n = difference.shape[0]
    means = np.empty(BOOTSTRAP_SAMPLES)
    for start in range(0, BOOTSTRAP_SAMPLES, 100):
        indices = rng.integers(0, n, size=(min(100, BOOTSTRAP_SAMPLES - start), n))
        means[start:start + len(indices)] = difference[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Delta:
    mean: float
    low: float = math.nan
    high: float = math.nan
    pairs: int = 1

    @property
    def significant(self) -> bool | None:
        if math.isnan(self.low):
            return None
        return not (self.low <= 0.0 <= self.high)


def pairs(quantized: list[CellResult], baselines: list[CellResult]) -> list[tuple[CellResult, CellResult]]:
    """(quantized, FP32 of the same seed) for every evaluated quantized run that has one."""
    by_seed = {b.seed: b for b in baselines if b.scores}
    return [(q, by_seed[q.seed]) for q in quantized if q.scores and q.seed in by_seed]


def unpaired(study: Study) -> list[CellResult]:
    """Evaluated quantized runs with no evaluated FP32 run of the same seed (model, dataset): in no delta."""
    found = []
    for experiment in study.experiments():
        seeds = {b.seed for b in study.baselines(experiment)}
        found += [c for c in study.cells if c.experiment == experiment and not c.is_baseline and c.scores
                  and c.seed not in seeds]
    return found


def _score(corruption: str | None) -> Callable[[CellResult], float | None]:
    def score(cell: CellResult) -> float | None:
        if corruption is None:
            return cell.corrupted_mean()
        return cell.per_corruption().get(corruption)

    return score


def paired_delta(
    study: Study, quantized: list[CellResult], baselines: list[CellResult], corruption: str | None
) -> Delta | None:
    """Quantized minus FP32 on one corruption (mean over severities), on the clean set ('clean'), or (None) on
    the mean over every corrupted split; paired by seed, with its interval."""
    score = _score(corruption)
    scored = [(q, b, score(q) - score(b)) for q, b in pairs(quantized, baselines)
              if score(q) is not None and score(b) is not None]
    if not scored:
        return None
    if len(scored) >= 2:
        return Delta(*t_interval([value for _, _, value in scored]), pairs=len(scored))
    q, b, value = scored[0]  # the interval comes from the very pair the delta does
    low, high = _bootstrap(study, q, b, corruption)
    return Delta(value, low, high)


def _bootstrap(study: Study, q: CellResult, b: CellResult, corruption: str | None) -> tuple[float, float]:
    q_pred, b_pred = study.predictions(q), study.predictions(b)
    if not q_pred or not b_pred:
        return math.nan, math.nan
    if corruption is None:
        splits = [s for s in q_pred if s != CLEAN and s in b_pred]
    else:
        splits = [s for s in q_pred if corruption_of(s) == corruption and s in b_pred]
    if not splits or len({len(q_pred[s]) for s in splits} | {len(b_pred[s]) for s in splits}) != 1:
        return math.nan, math.nan
    return paired_bootstrap(np.stack([q_pred[s] for s in splits]), np.stack([b_pred[s] for s in splits]))


# ---------------------------------------------------------------- robustness measures side by side


# Each measure that votes, and the sign of "more robust than FP32" in it. Eq. 5 is left out: it is monotone in
# the corrupted delta of the same two accuracies, so it would count that vote twice.
MEASURES = (("corrupted delta", +1), ("relative robustness delta", +1), ("mCE", -1))


@dataclass
class Robustness:
    """One run's robustness measures; the deltas against the FP32 run of its seed (None for FP32 itself)."""

    cell: CellResult
    corrupted: float | None
    relative: float | None  # 100 * mean corrupted / clean
    corrupted_delta: float | None = None
    relative_delta: float | None = None
    mce: float | None = None  # percent, FP32 = 100
    eq5: float | None = None

    def signs(self) -> dict[str, int]:
        """+1 (more robust than FP32), -1 (less) or 0 per measure the run has (mCE: relative to 100)."""
        values = {"corrupted delta": self.corrupted_delta, "relative robustness delta": self.relative_delta,
                  "mCE": None if self.mce is None else self.mce - 100.0}
        return {name: int(np.sign(values[name])) * direction for name, direction in MEASURES
                if values[name] is not None}

    @property
    def agreement(self) -> str:
        """'more robust (all 4 agree)', 'less robust (all 4 agree)' or which say what."""
        signs = self.signs()
        if not signs:
            return ""
        verdicts = {1: "more robust", -1: "less robust", 0: "no change"}
        if len(set(signs.values())) == 1:
            return f"{verdicts[next(iter(signs.values()))]} (all {len(signs)} agree)"
        return "; ".join(f"{verdicts[v]}: " + ", ".join(n for n, s in signs.items() if s == v)
                         for v in (1, -1, 0) if v in signs.values())


def robustness(cell: CellResult, baseline: CellResult | None) -> Robustness:
    """The measures of one run against `baseline`, the FP32 run of its seed (None: no deltas)."""
    found = Robustness(cell, cell.corrupted_mean(), relative_robustness(cell.scores))
    if baseline is None or cell.is_baseline or found.corrupted is None:
        return found
    fp_corrupted, fp_relative = baseline.corrupted_mean(), relative_robustness(baseline.scores)
    if fp_corrupted is not None:
        found.corrupted_delta = found.corrupted - fp_corrupted
        found.eq5 = error_improvement(fp_corrupted, found.corrupted)
    if found.relative is not None and fp_relative is not None:
        found.relative_delta = found.relative - fp_relative
    found.mce = mean_corruption_error(cell.scores, baseline.scores)
    return found


def robustness_rows(study: Study, experiment) -> list[Robustness]:
    """FP32 runs first, then every evaluated quantized run paired with the FP32 run of its seed."""
    baselines = study.baselines(experiment)
    by_seed = {b.seed: b for b in baselines}
    found = [robustness(b, None) for b in sorted(baselines, key=lambda c: c.seed or 0)]
    for method in study.methods(experiment):
        for cells in study.levels(experiment, method).values():
            found += [robustness(c, by_seed.get(c.seed)) for c in cells if c.scores]
    return found
