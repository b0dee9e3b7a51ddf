"""The report's figures (matplotlib, Agg canvas, written atomically as PNG): the paper's Figure 2 (per-corruption
deltas) and Figure 1 (validation loss), accuracy against severity, methods side by side, quantization noise."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from quantizers import method_colour, method_label
from records.measures import severity_means
from records.splits import CLEAN, CORRUPTIONS, SEVERITIES
from records.store import write_atomically
from study.report.loading import CellResult, Study
from study.report.statistics import Delta, paired_delta

# The paper's Figure 3a layout: the clean set, then the 19 corruptions alphabetically, in rows of 5.
_PANELS = (CLEAN, *sorted(CORRUPTIONS))
FIGURE_ORDER = tuple(_PANELS[row:row + 5] for row in range(0, len(_PANELS), 5))
PALETTE = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
MARKERS = "osD^vP*Xhp<>"


def label(corruption: str) -> str:
    if corruption == CLEAN:
        return "Test Set"
    return corruption.replace("_", " ").title().replace("Jpeg", "JPEG")


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
    palette = PALETTE
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
            delta = paired_delta(study, finished, baselines, None) if finished else None
            if delta is not None:
                points.append((finished[0].weight_bits, delta))
        if not points:
            continue
        bits = [b for b, _ in points]
        means = np.array([d.mean for _, d in points])
        lows = np.array([d.low if not math.isnan(d.low) else d.mean for _, d in points])
        highs = np.array([d.high if not math.isnan(d.high) else d.mean for _, d in points])
        axis.errorbar(bits, means, yerr=[means - lows, highs - means], marker="o", capsize=3,
                      label=method_label(method), color=method_colour(method))
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
    """{(method, layer group): {weight bits: [mean last-epoch noise mean square per cell]}} over the body layers.

    A layer held at other bits than its cell's in any cell of the method (the first and last layers, at 8 bits
    by default) is left out at every bits level, 8 included, where its bits happen to equal the cell's."""
    lasts: dict[str, list[tuple[CellResult, dict]]] = defaultdict(list)
    for cell in study.cells:
        if cell.experiment == experiment and not cell.is_baseline and study.epochs(cell):
            lasts[cell.method].append((cell, study.epochs(cell)[-1]))
    series: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for method, found in lasts.items():
        held = {key.split("/", 1)[1] for cell, last in found for key, bits in last.items()
                if key.startswith("quant_bits/") and bits != cell.weight_bits}
        for cell, last in found:
            groups: dict[str, list[float]] = defaultdict(list)
            for key, value in last.items():
                if key.startswith("quant_noise/") and key != "quant_noise/mean" and isinstance(value, int | float):
                    layer = key.split("/", 1)[1]
                    if layer not in held:
                        groups[layer.split(".")[0]].append(value)
            for group, values in groups.items():
                series[(method, group)][cell.weight_bits].append(float(np.mean(values)))
    return series


def noise_figure(study: Study, experiment, path: Path) -> bool:
    """Per-layer-group weight quantization noise (mean square, last epoch) against bits, log scale, with the
    uniform-grid expectation 4^-b for reference; hollow markers of distinct shapes so none hides another."""
    series = noise_by_bits(study, experiment)
    if not series:
        return False
    figure = _figure(6.5, 4.0)
    axis = figure.subplots()
    for i, ((method, group), by_bits) in enumerate(sorted(series.items())):
        bits = sorted(by_bits)
        axis.plot(bits, [np.mean(by_bits[b]) for b in bits], marker=MARKERS[i % len(MARKERS)], markersize=7,
                  markerfacecolor="none", label=f"{method_label(method)}: {group}")
    anchor_bits = min(b for by_bits in series.values() for b in by_bits)
    anchor = max(np.mean(v[anchor_bits]) for v in series.values() if anchor_bits in v)
    reference = np.arange(anchor_bits, 9)
    axis.plot(reference, anchor * 4.0 ** (anchor_bits - reference), "k--", linewidth=0.8, label="4^-b")
    axis.set_yscale("log")
    axis.set_xlabel("weight bits")
    axis.set_ylabel("weight noise mean square E[delta^2] (last epoch)")
    axis.set_title(f"{experiment[0]} on {experiment[1]}: quantization noise by layer group", fontsize=10)
    axis.legend(fontsize=6, ncol=2)
    save_png(figure, path)
    return True


def severity_curves(study: Study, experiment, method: str) -> dict[str, dict[int, float]]:
    """{'FP32' and each bits level: {severity (0 = clean): mean score over corruptions and seeds}}."""
    curves: dict[str, dict[int, float]] = {}
    groups = {"FP32": study.baselines(experiment)}
    groups.update({bits: [c for c in cells if c.scores] for bits, cells in study.levels(experiment, method).items()})
    for name, cells in groups.items():
        by_severity: dict[int, list[float]] = defaultdict(list)
        for cell in cells:
            for severity, value in severity_means(cell.scores).items():
                by_severity[severity].append(value)
        if by_severity:
            curves[name] = {s: float(np.mean(v)) for s, v in sorted(by_severity.items())}
    return curves


def severity_figure(title: str, curves: dict[str, dict[int, float]], path: Path, metric: str = "accuracy") -> bool:
    """Mean score over the corruptions against severity 1-5 (the clean score at 0), FP32 and each bits level."""
    if not any(any(s in SEVERITIES for s in curve) for curve in curves.values()):
        return False
    figure = _figure(6.0, 3.8)
    axis = figure.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        severities = sorted(curve)
        axis.plot(severities, [curve[s] for s in severities], marker=MARKERS[i % len(MARKERS)],
                  color="black" if name == "FP32" else PALETTE[i % len(PALETTE)], label=name)
    axis.set_xticks([0, *SEVERITIES], ["clean", *map(str, SEVERITIES)])
    axis.set_xlabel("corruption severity")
    axis.set_ylabel(f"mean {metric} over corruptions (%)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7)
    save_png(figure, path)
    return True
