"""`cli.py report <study dir>`: the paper's artefacts from a study's results store and metric files only.

Writes `<study dir>/report/`: `report.md` (embedding the figures), PNG figures, CSV tables, and logs the same
to W&B (offline unless a key is configured; a W&B failure never fails the report).

- Figure 2 (per model/dataset/method): for each bits level a 4 x 5 grid of quantized-minus-FP32 accuracy
  deltas (percentage points) on the clean test set and the 19 corruptions (mean over severities), in the
  paper's Figure 3a order, on a diverging colour map centred on 0.
- Table 1: mean accuracy over the corrupted test sets and the relative error improvement of Eq. 5.
- Figure 1: validation loss per epoch of FP32 and each bits level, minimum marked (overfitting onset).
- Uncertainty the paper lacks: with >= 2 seeds, mean and 95 % t-interval of every delta over seeds; with
  one seed, a paired bootstrap over test images (same images resampled for both models). Deltas whose
  interval contains 0 are printed in grey.
- Detection studies: P (clean mAP50), mPC (mean over the 15 benchmark corruptions x 5 severities), rPC.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from study.grid import StudyError
from study.metrics import CLEAN, error_improvement
from study.store import RESULTS_FILE, ResultsStoreError, read_rows, write_atomically

FIGURE_ORDER = (
    ("clean", "brightness", "contrast", "defocus_blur", "elastic_transform"),
    ("fog", "frost", "gaussian_blur", "gaussian_noise", "glass_blur"),
    ("impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "saturate"),
    ("shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur"),
)
BENCHMARK = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
    "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
BOOTSTRAP_SAMPLES = 1000
METHOD_LABELS = {"lsq": "LSQ", "pact_dorefa": "PACT + DoReFa", "dorefa": "DoReFa (weights only)", "fp32": "FP32"}


def label(corruption: str) -> str:
    if corruption == CLEAN:
        return "Test Set"
    return corruption.replace("_", " ").title().replace("Jpeg", "JPEG")


@dataclass
class CellResult:
    """Everything the report knows about one run of the study."""

    run: str
    model: str
    dataset: str
    method: str
    weight_bits: int
    act_bits: int
    seed: int | None
    scores: dict[str, float] = field(default_factory=dict)  # split name -> accuracy (or mAP50), percent
    metric: str = "accuracy"
    diverged_at: float | None = None
    test_loss: float | None = None  # on the clean test set
    train: dict[str, float] = field(default_factory=dict)  # measures on training images (FlatnessCallback)
    theorem: dict[int, dict[str, float]] = field(default_factory=dict)  # bits -> theorem_* measures

    @property
    def experiment(self) -> tuple[str, str]:
        return self.model, self.dataset

    @property
    def bits_label(self) -> str:
        if self.method == "fp32":
            return "FP32"
        if self.method == "dorefa" or self.act_bits == 32:
            return f"W{self.weight_bits}"
        return f"W{self.weight_bits}A{self.act_bits}"

    def per_corruption(self) -> dict[str, float]:
        """Clean score and, per corruption, the mean over its severities."""
        groups: dict[str, list[float]] = defaultdict(list)
        for split, value in self.scores.items():
            groups[split.partition("/")[0]].append(value)
        return {name: float(np.mean(values)) for name, values in groups.items()}

    def corrupted_mean(self, corruptions: tuple[str, ...] | None = None) -> float | None:
        values = [v for s, v in self.scores.items()
                  if s != CLEAN and (corruptions is None or s.partition("/")[0] in corruptions)]
        return float(np.mean(values)) if values else None


def load_cells(study_dir: Path) -> list[CellResult]:
    path = study_dir / RESULTS_FILE
    try:
        rows = read_rows(path)
    except ResultsStoreError as error:
        raise StudyError(f"cannot report on {study_dir}: {error}") from None
    cells: dict[str, CellResult] = {}
    # A run's identity comes from its evaluation rows; theorem rows reuse weight_bits for the simulated noise.
    is_primary = [r["metric"] in ("accuracy", "map50", "diverged") for r in rows]
    ordered = [r for r, p in zip(rows, is_primary, strict=True) if p] + [
        r for r, p in zip(rows, is_primary, strict=True) if not p]
    for row in ordered:
        cell = cells.setdefault(row["run"], CellResult(
            row["run"], row["model"], row["dataset"], row["method"], row["weight_bits"], row["act_bits"], row["seed"]))
        split = CLEAN if row["corruption"] == CLEAN else f"{row['corruption']}/{row['severity']}"
        metric, value = row["metric"], row["value"]
        if metric == "diverged":
            cell.diverged_at = value
        elif metric.startswith("theorem_"):
            cell.theorem.setdefault(row["weight_bits"], {})[metric] = value
        elif row["split"] == "train":
            cell.train[metric] = value
        elif metric in ("accuracy", "map50"):
            cell.metric = metric
            cell.scores[split] = value  # a re-evaluation overwrites: the latest row wins
        elif metric == "loss" and split == CLEAN:
            cell.test_loss = value
    if not any(c.scores or c.diverged_at is not None for c in cells.values()):
        raise StudyError(f"no results in {path}: run the study's cells first (cli.py study --config ...)")
    return list(cells.values())


# ---------------------------------------------------------------- uncertainty


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


# ---------------------------------------------------------------- deltas


@dataclass
class Delta:
    mean: float
    low: float = math.nan
    high: float = math.nan

    @property
    def significant(self) -> bool | None:
        if math.isnan(self.low):
            return None
        return not (self.low <= 0.0 <= self.high)


class Study:
    """A study's cells, grouped the way the report needs them."""

    def __init__(self, study_dir: Path) -> None:
        self.directory = study_dir
        self.cells = load_cells(study_dir)
        self._predictions: dict[str, dict[str, np.ndarray] | None] = {}

    def experiments(self) -> list[tuple[str, str]]:
        return sorted({c.experiment for c in self.cells})

    def baselines(self, experiment) -> list[CellResult]:
        return [c for c in self.cells if c.experiment == experiment and c.method == "fp32" and c.scores]

    def methods(self, experiment) -> list[str]:
        return sorted({c.method for c in self.cells if c.experiment == experiment and c.method != "fp32"})

    def levels(self, experiment, method) -> dict[str, list[CellResult]]:
        """bits label -> cells (one per seed), sorted by weight bits."""
        found: dict[str, list[CellResult]] = defaultdict(list)
        cells = sorted((c for c in self.cells if c.experiment == experiment and c.method == method),
                       key=lambda c: (c.weight_bits, c.act_bits))
        for c in cells:
            found[c.bits_label].append(c)
        return dict(found)

    def predictions(self, cell: CellResult) -> dict[str, np.ndarray] | None:
        if cell.run not in self._predictions:
            from callbacks.results import PREDICTIONS_FILE, load_predictions

            path = self.directory / "cells" / cell.run / PREDICTIONS_FILE
            self._predictions[cell.run] = load_predictions(path) if path.exists() else None
        return self._predictions[cell.run]

    def delta(self, quantized: list[CellResult], baselines: list[CellResult], corruption: str | None) -> Delta | None:
        """Quantized minus FP32 on one corruption (mean over severities), on the clean set, or (None) on the
        mean over every corrupted split; with its interval."""

        def score(cell: CellResult) -> float | None:
            if corruption is None:
                return cell.corrupted_mean()
            return cell.per_corruption().get(corruption)

        by_seed = {b.seed: b for b in baselines}
        pairs = [(q, by_seed.get(q.seed, baselines[0])) for q in quantized if q.scores and baselines]
        values = [score(q) - score(b) for q, b in pairs if score(q) is not None and score(b) is not None]
        if not values:
            return None
        if len(values) >= 2:
            return Delta(*t_interval(values))
        q, b = pairs[0]
        low, high = self._bootstrap(q, b, corruption)
        return Delta(values[0], low, high)

    def _bootstrap(self, q: CellResult, b: CellResult, corruption: str | None) -> tuple[float, float]:
        q_pred, b_pred = self.predictions(q), self.predictions(b)
        if not q_pred or not b_pred:
            return math.nan, math.nan
        if corruption is None:
            splits = [s for s in q_pred if s != CLEAN and s in b_pred]
        else:
            splits = [s for s in q_pred if s.partition("/")[0] == corruption and s in b_pred]
        if not splits or len({len(q_pred[s]) for s in splits} | {len(b_pred[s]) for s in splits}) != 1:
            return math.nan, math.nan
        return paired_bootstrap(np.stack([q_pred[s] for s in splits]), np.stack([b_pred[s] for s in splits]))


# ---------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    write_atomically(path, buffer.getvalue())


def delta_figure(title: str, panels: dict[str, dict[str, Delta | None]], path: Path) -> None:
    """Figure 2 of the paper: one 4 x 5 heatmap of deltas per bits level."""
    from matplotlib.colors import TwoSlopeNorm

    values = [d.mean for cells in panels.values() for d in cells.values() if d is not None]
    bound = max([abs(v) for v in values] + [0.5])
    norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    figure = _figure(5.2 * len(panels) + 1.0, 4.0)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for axis, (bits, cells) in zip(axes, panels.items(), strict=True):
        grid = np.full((4, 5), np.nan)
        for r, row in enumerate(FIGURE_ORDER):
            for c, corruption in enumerate(row):
                delta = cells.get(corruption)
                if delta is not None:
                    grid[r, c] = delta.mean
        image = axis.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
        for r, row in enumerate(FIGURE_ORDER):
            for c, corruption in enumerate(row):
                delta = cells.get(corruption)
                noise = delta is not None and delta.significant is False
                style = {"color": "dimgray" if noise else "black", "fontstyle": "italic" if noise else "normal"}
                axis.text(c, r - 0.3, label(corruption).replace(" ", "\n", 1) if len(label(corruption)) > 11
                          else label(corruption), ha="center", va="center", fontsize=6, linespacing=0.9)
                axis.text(c, r + 0.02, "n/a" if delta is None else f"{delta.mean:+.1f}", ha="center", va="center",
                          fontsize=10, fontweight="normal" if noise else "bold", **style)
                if delta is not None and not math.isnan(delta.low):
                    axis.text(c, r + 0.3, f"[{delta.low:+.1f}, {delta.high:+.1f}]", ha="center", va="center",
                              fontsize=6.5, **style)
        axis.set_title(bits, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="quantized - FP32 accuracy (pp)")
    figure.suptitle(title, fontsize=10)
    figure.text(0.5, 0.01, "bold: the 95 % interval [in brackets] excludes 0;  grey italic: within noise;  "
                "each corruption is the mean over its severities", ha="center", fontsize=7)
    save_png(figure, path)


def validation_losses(runs: list[list[dict]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, losses of shape (runs, epochs)) over the epochs every run reached, or None."""
    series = [[(r["epoch"], r["val/loss"]) for r in run if isinstance(r.get("val/loss"), int | float)] for run in runs]
    series = [s for s in series if s]
    if not series:
        return None
    length = min(len(s) for s in series)
    return np.array([e for e, _ in series[0][:length]]), np.array([[v for _, v in s[:length]] for s in series])


def min_loss_epoch(runs: list[list[dict]]) -> int | None:
    """Epoch of the minimum mean validation loss: where overfitting starts."""
    curves = validation_losses(runs)
    return None if curves is None else int(curves[0][int(np.argmin(curves[1].mean(axis=0)))])


def loss_figure(title: str, curves: dict[str, list[list[dict]]], path: Path) -> None:
    """Figure 1 of the paper: validation loss per epoch for FP32 and each bits level, minimum marked."""
    figure = _figure(6.0, 3.8)
    axis = figure.subplots()
    colours = {"FP32": "black"}
    palette = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
    for i, (name, runs) in enumerate(curves.items()):
        found = validation_losses(runs)
        if found is None:
            continue
        epochs, losses = found
        mean = losses.mean(axis=0)
        colour = colours.get(name, palette[i % len(palette)])
        best = int(np.argmin(mean))
        axis.plot(epochs, mean, color=colour, label=f"{name} (min at epoch {epochs[best]})")
        if len(losses) > 1:
            axis.fill_between(epochs, losses.min(axis=0), losses.max(axis=0), color=colour, alpha=0.15)
        axis.plot([epochs[best]], [mean[best]], marker="o", color=colour)
        axis.axvline(epochs[best], color=colour, linestyle=":", linewidth=0.8)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation loss")
    low, high = axis.dataLim.intervaly
    if axis.lines and low > 0 and high / low > 20:
        # the first epochs' loss can be 100x the plateau; on a linear axis the minimum would be invisible
        axis.set_yscale("log")
        axis.set_ylabel("validation loss (log scale)")
    axis.set_title(title, fontsize=10)
    if axis.lines:
        axis.legend(fontsize=7)
    else:
        axis.text(0.5, 0.5, "no validation-loss history", ha="center", va="center", transform=axis.transAxes)
    save_png(figure, path)


# ---------------------------------------------------------------- tables and the report


def _format(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue().encode())


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(value: float | None, error: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:.{digits}g}" + ("" if error is None or math.isnan(error) else f" ± {error:.2g}")


def generalization_table(study: Study, experiment) -> list[list[Any]]:
    """Per run: test and train accuracy/loss, their gaps, flatness, and the corrupted-accuracy delta."""
    baselines = study.baselines(experiment)
    rows = []
    cells = sorted((c for c in study.cells if c.experiment == experiment and c.scores),
                   key=lambda c: (c.method != "fp32", c.method, c.weight_bits, c.seed or 0))
    for cell in cells:
        train = cell.train
        test_acc = cell.scores.get(CLEAN)
        gap_acc = None if "accuracy" not in train or test_acc is None else train["accuracy"] - test_acc
        gap_loss = None if "loss" not in train or cell.test_loss is None else cell.test_loss - train["loss"]
        delta = None if cell.method == "fp32" else study.delta([cell], baselines, None)
        onset = min_loss_epoch([_epochs(study.directory, cell)])
        rows.append([cell.method, cell.bits_label, cell.seed, _format(test_acc), _format(train.get("accuracy")),
                     _format(gap_acc), _format(cell.test_loss, 3), _format(train.get("loss"), 3), _format(gap_loss, 3),
                     _pm(train.get("sharpness"), train.get("sharpness_stderr")),
                     _pm(train.get("hessian_trace"), train.get("hessian_trace_stderr")),
                     "" if onset is None else onset, "" if delta is None else f"{delta.mean:+.2f}"])
    return rows


def method_comparison_figure(study: Study, experiment, path: Path) -> bool:
    """Delta of the mean corrupted accuracy against bits, one line per method (the matched-noise control
    beside the quantizers): does quantization regularize more, less or the same as plain noise?"""
    baselines = study.baselines(experiment)
    figure = _figure(6.0, 3.8)
    axis = figure.subplots()
    drawn = False
    for method in study.methods(experiment):
        points = []
        for cells in study.levels(experiment, method).values():
            finished = [c for c in cells if c.scores]
            delta = study.delta(finished, baselines, None) if finished else None
            if delta is not None:
                points.append((finished[0].weight_bits, delta))
        if not points:
            continue
        bits = [b for b, _ in points]
        means = np.array([d.mean for _, d in points])
        lows = np.array([d.low if not math.isnan(d.low) else d.mean for _, d in points])
        highs = np.array([d.high if not math.isnan(d.high) else d.mean for _, d in points])
        axis.errorbar(bits, means, yerr=[means - lows, highs - means], marker="o", capsize=3,
                      label=METHOD_LABELS.get(method, method))
        drawn = True
    if not drawn:
        return False
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("weight bits")
    axis.set_ylabel("mean corrupted accuracy - FP32 (pp)")
    axis.set_title(f"{experiment[0]} on {experiment[1]}: methods side by side", fontsize=10)
    axis.legend(fontsize=7)
    save_png(figure, path)
    return True


def noise_by_bits(study: Study, experiment) -> dict[tuple[str, str], dict[int, list[float]]]:
    """{(method, layer group): {weight bits: [mean last-epoch noise variance per cell]}}, counting only the
    layers quantized at the cell's weight bits (first/last layers held at their own precision are left out)."""
    series: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in study.cells:
        if cell.experiment != experiment or cell.method == "fp32":
            continue
        epochs = _epochs(study.directory, cell)
        if not epochs:
            continue
        last = epochs[-1]
        groups: dict[str, list[float]] = defaultdict(list)
        for key, value in last.items():
            if key.startswith("quant_noise/") and key != "quant_noise/mean" and isinstance(value, int | float):
                layer = key.split("/", 1)[1]
                if last.get(f"quant_bits/{layer}", cell.weight_bits) != cell.weight_bits:
                    continue
                groups[layer.split(".")[0]].append(value)
        for group, values in groups.items():
            series[(cell.method, group)][cell.weight_bits].append(float(np.mean(values)))
    return series


def noise_figure(study: Study, experiment, path: Path) -> bool:
    """Per-layer-group weight quantization noise variance (last epoch) against bits, log scale, with the
    uniform-grid expectation 4^-b for reference."""
    series = noise_by_bits(study, experiment)
    if not series:
        return False
    figure = _figure(6.5, 4.0)
    axis = figure.subplots()
    for (method, group), by_bits in sorted(series.items()):
        bits = sorted(by_bits)
        axis.plot(bits, [np.mean(by_bits[b]) for b in bits], marker="o", label=f"{method}: {group}")
    anchor_bits = min(b for by_bits in series.values() for b in by_bits)
    anchor = max(np.mean(v[anchor_bits]) for v in series.values() if anchor_bits in v)
    reference = np.arange(anchor_bits, 9)
    axis.plot(reference, anchor * 4.0 ** (anchor_bits - reference), "k--", linewidth=0.8, label="4^-b")
    axis.set_yscale("log")
    axis.set_xlabel("weight bits")
    axis.set_ylabel("weight noise variance (last epoch)")
    axis.set_title(f"{experiment[0]} on {experiment[1]}: quantization noise by layer group", fontsize=10)
    axis.legend(fontsize=6, ncol=2)
    save_png(figure, path)
    return True


def theorem_rows(study: Study) -> list[list[Any]]:
    rows = []
    for cell in study.cells:
        for bits, values in sorted(cell.theorem.items()):
            rows.append([cell.run, bits, _format(values.get("theorem_noise_variance"), 8),
                         _pm(values.get("theorem_mc_increase"), values.get("theorem_mc_stderr"), 4),
                         _format(values.get("theorem_gradient_norm_term"), 5),
                         _pm(values.get("theorem_hessian_term"), values.get("theorem_hessian_stderr"), 4)])
    return rows


def mechanism_section(study: Study, figures: Path, images: dict[str, Path]) -> str:
    lines = ["## Mechanism: generalization gap, flatness, quantization noise", ""]
    header = ["method", "precision", "seed", "test acc", "train acc", "gap acc", "test loss", "train loss",
              "gap loss", "sharpness", "Hessian trace", "val-loss min epoch", "corrupted delta"]
    lines += ["Train measures use the first training images without augmentation; sharpness (mean loss increase "
              "under random weight perturbations of relative size rho) and the Hessian trace (Hutchinson) are taken "
              "on the full-precision function of each model's weights, the landscape Theorem 3.1 is about. "
              "A negative value says those weights are not at a minimum of the full-precision loss: expected at 2 "
              "bits, where the float weights behind the grid are far from the function that was trained. The "
              "noise figure shows only layers quantized at the cell's bits (not the first and last layers).", ""]
    for experiment in study.experiments():
        model, dataset = experiment
        lines += [f"### {model} on {dataset}", "", _markdown_table(header, generalization_table(study, experiment)), ""]
        name = f"methods_{model}_{dataset}.png"
        if method_comparison_figure(study, experiment, figures / name):
            images[name] = figures / name
            lines.append(f"![methods side by side](figures/{name})\n")
        name = f"noise_{model}_{dataset}.png"
        if noise_figure(study, experiment, figures / name):
            images[name] = figures / name
            lines.append(f"![quantization noise against bits](figures/{name})\n")
    theorem = theorem_rows(study)
    if theorem:
        lines += ["### Theorem 3.1", "", "E[L(w + delta)] - L(w) measured by Monte Carlo with each layer's delta of "
                  "the variance of b-bit quantization noise, beside Eq. 4's gradient-norm term (derived for squared "
                  "error) and the second-order term 0.5 sum_l sigma_l^2 tr(H_l) (cross-entropy).", "",
                  _markdown_table(["run", "bits", "mean sigma^2", "measured increase", "Eq. 4 term",
                                   "0.5 sum sigma^2 tr(H)"], theorem), ""]
    return "\n".join(lines)


def write_report(study_dir: str | Path, log_to_wandb: bool = True) -> Path:
    """Write `<study dir>/report/` and return the path of report.md."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StudyError(f"no study folder at {study_dir}")
    study = Study(study_dir)
    out = study_dir / "report"
    figures = out / "figures"
    table1_header = ["model", "dataset", "method", "precision", "seeds", "clean acc", "clean delta",
                     "avg corrupted acc", "corrupted delta [95% CI]", "Eq. 5 error improvement", "val-loss min epoch"]
    table1: list[list[Any]] = []
    delta_rows: list[list[Any]] = []
    sections: list[str] = []
    images: dict[str, Path] = {}
    for experiment in study.experiments():
        model, dataset = experiment
        baselines = study.baselines(experiment)
        if not baselines:
            sections.append(f"### {model} on {dataset}\n\nNo finished FP32 run: deltas cannot be computed.\n")
            continue
        fp_acc = _mean([b.corrupted_mean() for b in baselines])
        curves_fp = [_epochs(study_dir, b) for b in baselines]
        table1.append([model, dataset, "fp32", "FP32", len(baselines), _format(_mean([b.scores.get(CLEAN)
                       for b in baselines])), "", _format(fp_acc), "", "0.00", min_loss_epoch(curves_fp) or ""])
        section = [f"### {model} on {dataset}\n"]
        for method in study.methods(experiment):
            method_label = METHOD_LABELS.get(method, method)
            levels = study.levels(experiment, method)
            panels: dict[str, dict[str, Delta | None]] = {}
            curves = {"FP32": curves_fp}
            for bits, cells in levels.items():
                finished = [c for c in cells if c.scores]
                curves[bits] = [_epochs(study_dir, c) for c in finished]
                panels[bits] = {corruption: study.delta(finished, baselines, corruption)
                                for row in FIGURE_ORDER for corruption in row} if finished else {}
                for corruption, delta in panels[bits].items():
                    if delta is not None:
                        delta_rows.append([model, dataset, method, bits, corruption, _format(delta.mean, 3),
                                           _format(delta.low, 3), _format(delta.high, 3)])
                table1.append(_table1_row(study, experiment, method, bits, cells, baselines, fp_acc,
                                          panels[bits].get(CLEAN), min_loss_epoch(curves[bits])))
            title = f"{model} on {dataset}, {method_label}: quantized - FP32 accuracy (pp)"
            name = f"deltas_{model}_{dataset}_{method}.png"
            delta_figure(title, panels, figures / name)
            loss_name = f"val_loss_{model}_{dataset}_{method}.png"
            loss_figure(f"{model} on {dataset}, {method_label}: validation loss", curves, figures / loss_name)
            images.update({name: figures / name, loss_name: figures / loss_name})
            section += [f"![{title}](figures/{name})\n", f"![validation loss](figures/{loss_name})\n"]
        sections.append("\n".join(section))
    detection = _detection_table(study)
    sections.append(mechanism_section(study, figures, images))
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "table1.csv", table1_header, table1)
    _write_csv(out / "deltas.csv", ["model", "dataset", "method", "precision", "split", "delta", "low", "high"],
               delta_rows)
    report = _markdown(study, table1_header, table1, sections, detection)
    write_atomically(out / "report.md", report.encode())
    if log_to_wandb:
        _log_wandb(study_dir, table1_header, table1, images)
    return out / "report.md"


def _mean(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _table1_row(study: Study, experiment, method: str, bits: str, cells: list[CellResult],
                baselines: list[CellResult], fp_acc: float, clean: Delta | None, onset: int | None) -> list[Any]:
    model, dataset = experiment
    finished = [c for c in cells if c.scores]
    if not finished:
        diverged = [c for c in cells if c.diverged_at is not None]
        note = f"diverged at step {int(diverged[0].diverged_at)}" if diverged else "no results"
        return [model, dataset, method, bits, 0, note, "", "", "", "", ""]
    q_acc = _mean([c.corrupted_mean() for c in finished])
    corrupted = study.delta(finished, baselines, None)
    interval = ""
    if corrupted is not None:
        interval = f"{corrupted.mean:+.2f}"
        if not math.isnan(corrupted.low):
            interval += f" [{corrupted.low:+.2f}, {corrupted.high:+.2f}]"
    improvement = error_improvement(fp_acc, q_acc) if not math.isnan(q_acc + fp_acc) else math.nan
    return [model, dataset, method, bits, len(finished), _format(_mean([c.scores.get(CLEAN) for c in finished])),
            "" if clean is None else f"{clean.mean:+.2f}", _format(q_acc), interval, _format(improvement),
            onset if onset is not None else ""]


def _epochs(study_dir: Path, cell: CellResult) -> list[dict]:
    from callbacks.results import METRICS_FILE, read_epoch_metrics

    path = study_dir / "cells" / cell.run / METRICS_FILE
    return read_epoch_metrics(path) if path.exists() else []


def _detection_table(study: Study) -> list[list[Any]]:
    rows = []
    for cell in study.cells:
        if cell.metric != "map50" or CLEAN not in cell.scores:
            continue
        p = cell.scores[CLEAN]
        mpc = cell.corrupted_mean(BENCHMARK)
        rpc = mpc / p if mpc is not None and p else None
        rows.append([cell.model, cell.dataset, cell.method, cell.bits_label, cell.seed, _format(p), _format(mpc),
                     _format(None if rpc is None else 100 * rpc)])
    return rows


def _markdown(study: Study, header, table1, sections, detection) -> str:
    name = study.directory.name
    diverged = [c for c in study.cells if c.diverged_at is not None]
    seeds = sorted({c.seed for c in study.cells if c.seed is not None})
    lines = [
        f"# Study report: {name}",
        "",
        f"{len(study.cells)} runs ({sum(bool(c.scores) for c in study.cells)} evaluated), seeds {seeds}. "
        "Accuracies in percent on the clean test set and its corrupted copies (19 corruptions x 5 severities "
        "unless the study chose fewer). A delta is quantized minus FP32 in percentage points; positive (green) "
        "means the quantized model is more accurate.",
        "",
        "**Uncertainty.** " + ("With several seeds each delta is the mean over seeds with a 95 % Student-t "
                               "interval." if len(seeds) > 1 else
                               "With one seed each delta carries a 95 % paired-bootstrap interval over test images "
                               f"({BOOTSTRAP_SAMPLES} resamples; the same images for both models)."),
        "Deltas whose interval contains 0 are grey and italic in the figures: they are within noise.",
        "",
        "## Table 1: accuracy under corruption and relative error improvement (Eq. 5)",
        "",
        "Eq. 5 is `100 * log10((100 - fp) / (100 - q))` on the mean accuracy over the corrupted test sets; "
        "positive means fewer errors than FP32. The last column is the epoch of minimum validation loss "
        "(the overfitting onset of Figure 1).",
        "",
        _markdown_table(header, table1),
        "",
    ]
    if diverged:
        lines += ["**Diverged runs:** " + ", ".join(f"{c.run} (step {int(c.diverged_at)})" for c in diverged), ""]
    if detection:
        lines += ["## Detection robustness", "", "P = clean mAP50, mPC = mean mAP50 over the 15 benchmark "
                  "corruptions x 5 severities, rPC = mPC / P (%).", "",
                  _markdown_table(["model", "dataset", "method", "precision", "seed", "P", "mPC", "rPC %"],
                                  detection), ""]
    lines += ["## Figure 2: per-corruption deltas, and Figure 1: validation loss", "", *sections, ""]
    lines += ["Files: `table1.csv`, `deltas.csv` (every delta with its interval), `figures/`."]
    return "\n".join(lines) + "\n"


def _log_wandb(study_dir: Path, header, table1, images: dict[str, Path]) -> None:
    """The report as a W&B run of the study's group (job_type report); never fails the report."""
    import os

    try:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "disabled":
            return
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "qreg"), group=study_dir.name, job_type="report",
                         name=f"{study_dir.name}-report", dir=str(study_dir), mode=mode, reinit="finish_previous")
        run.log({"table1": wandb.Table(columns=header, data=[[str(x) for x in row] for row in table1]),
                 **{name: wandb.Image(str(path)) for name, path in images.items()}})
        run.finish()
    except Exception as error:  # W&B is a mirror of the report, never a reason to lose it
        print(f"qreg: W&B logging of the report skipped: {error}")
