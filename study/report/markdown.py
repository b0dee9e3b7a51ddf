"""The report's text: Markdown tables and sections, and the CSV files beside them."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from quantizers import method_label
from records.measures import detection_summary
from records.splits import BENCHMARK_CORRUPTIONS, CLEAN, CORRUPTIONS, corruption_of
from records.store import write_atomically
from study.report.loading import CellResult, Study
from study.report.statistics import BOOTSTRAP_SAMPLES, Delta, Robustness, paired_delta


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.{digits}f}"


def plus_minus(value: float | None, error: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:.{digits}g}" + ("" if error is None or math.isnan(error) else f" ± {error:.2g}")


def with_interval(found: Delta | None) -> str:
    if found is None:
        return ""
    text = f"{found.mean:+.2f}"
    return text if math.isnan(found.low) else text + f" [{found.low:+.2f}, {found.high:+.2f}]"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue().encode())


# ---------------------------------------------------------------- robustness measures


ROBUSTNESS_HEADER = ["run", "method", "precision", "seed", "weights: epoch / step", "clean", "mean corrupted",
                     "corrupted delta", "relative robustness %", "relative robustness delta", "mCE % (FP32 = 100)",
                     "Eq. 5", "the measures say"]


def robustness_row(found: Robustness) -> list[Any]:
    cell = found.cell
    return [cell.run, method_label(cell.method), cell.bits_label, "" if cell.seed is None else cell.seed,
            cell.weights_at, fmt(cell.scores.get(CLEAN)), fmt(found.corrupted), signed(found.corrupted_delta),
            fmt(found.relative), signed(found.relative_delta), "100.00" if cell.is_baseline else fmt(found.mce),
            "0.00" if cell.is_baseline else signed(found.eq5), found.agreement]


def corruption_sets(rows: list[Robustness]) -> str:
    """Which corruptions the table's measures average over, named: mCE's 15 benchmark corruptions and the others'
    every corruption tested differ as soon as a study tests any of the 4 extra ones (all 19 by default)."""
    tested = {corruption_of(name) for r in rows for name in r.cell.scores if name != CLEAN}
    tested_list = [c for c in CORRUPTIONS if c in tested] + sorted(tested - set(CORRUPTIONS))
    benchmark = [c for c in tested_list if c in BENCHMARK_CORRUPTIONS]
    extra = [c for c in tested_list if c not in BENCHMARK_CORRUPTIONS]
    if not tested_list:
        return ""
    if not extra:
        return (f"**Corruption sets.** Every measure here is over the same {len(tested_list)} corruptions, all of them "
                "benchmark ones: " + ", ".join(tested_list) + ".")
    return (f"**Corruption sets.** The mean corrupted accuracy, its delta, relative robustness and Eq. 5 are over "
            f"all {len(tested_list)} corruptions tested ({len(benchmark)} benchmark ones and {', '.join(extra)}); "
            f"mCE is over the {len(benchmark)} benchmark ones only, leaving out {', '.join(extra)}. So the last "
            "column's vote compares measures over two different sets of corruptions: a run's accuracy under "
            f"{', '.join(extra)} moves the corrupted delta and relative robustness, not mCE.")


def robustness_text(rows: list[Robustness], seeds: int) -> list[str]:
    """The section's explanation, the corruptions each measure is over, and which measures agree in sign."""
    quantized = [r for r in rows if not r.cell.is_baseline and r.signs()]
    agree = [r for r in quantized if len(set(r.signs().values())) == 1]
    sets = corruption_sets(rows)
    lines = [
        "Robustness measures differ across the literature: the paper and its follow-up report Eq. 5 on mean "
        "corrupted accuracy, independent ImageNet-C studies of DoReFa / PACT / LSQ (e.g. Xiao et al. 2023) relative "
        "robustness and mCE, and find low bit widths *less* robust. Here all of them, per run, against the FP32 run "
        "of the same seed: the mean corrupted accuracy and its delta (pp); relative robustness = 100 x mean "
        "corrupted / clean accuracy (the classification analogue of rPC) and its delta; mCE = the mean over the 15 "
        "benchmark corruptions of the run's error summed over severities divided by FP32's (%, FP32 = 100, lower is "
        "more robust); Eq. 5. The corrupted delta and Eq. 5 always share a sign (Eq. 5 is monotone in the delta of "
        "the same two accuracies), so the sign vote counts three measures: the corrupted delta, relative robustness "
        "(which can disagree, since it discounts a change of clean accuracy) and mCE (which weighs each benchmark "
        "corruption by FP32's error on it).",
        "",
        *([sets, ""] if sets else []),
    ]
    if quantized:
        lines.append(f"**Agreement in sign**: all measures agree for {len(agree)} of {len(quantized)} quantized runs"
                     + ("." if len(agree) == len(quantized) else "; the others are spelled out in the last column."))
        lines.append("")
    if seeds <= 1:
        lines += ["With one seed the intervals elsewhere in this report come from a bootstrap over test images: they "
                  "cover test-image sampling only, not training randomness (another seed can move every measure by "
                  "more than that interval).", ""]
    return lines


# ---------------------------------------------------------------- Table 1 and the mechanism tables


TABLE1_HEADER = ["model", "dataset", "method", "precision", "seeds", "clean acc", "clean delta", "avg corrupted acc",
                 "corrupted delta [95% CI]", "Eq. 5 error improvement", "val-loss min epoch"]


def mean_of(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


GENERALIZATION_HEADER = ["method", "precision", "seed", "weights: epoch / step", "test acc", "train acc", "gap acc",
                         "test loss", "train loss", "gap loss", "sharpness", "Hessian trace", "val-loss min epoch",
                         "corrupted delta"]


def generalization_table(study: Study, experiment, onset) -> list[list[Any]]:
    """Per run: test and train accuracy/loss, their gaps, flatness, and the corrupted-accuracy delta."""
    baselines = study.baselines(experiment)
    rows = []
    cells = sorted((c for c in study.cells if c.experiment == experiment and c.scores),
                   key=lambda c: (not c.is_baseline, c.method, c.weight_bits, c.seed or 0))
    for cell in cells:
        train = cell.train
        test_acc = cell.scores.get(CLEAN)
        gap_acc = None if "accuracy" not in train or test_acc is None else train["accuracy"] - test_acc
        gap_loss = None if "loss" not in train or cell.test_loss is None else cell.test_loss - train["loss"]
        found = None if cell.is_baseline else paired_delta(study, [cell], baselines, None)
        epoch = onset(cell)
        rows.append([cell.method, cell.bits_label, cell.seed, cell.weights_at, fmt(test_acc),
                     fmt(train.get("accuracy")), fmt(gap_acc), fmt(cell.test_loss, 3), fmt(train.get("loss"), 3),
                     fmt(gap_loss, 3), plus_minus(train.get("sharpness"), train.get("sharpness_stderr")),
                     plus_minus(train.get("hessian_trace"), train.get("hessian_trace_stderr")),
                     "" if epoch is None else epoch, "" if found is None else f"{found.mean:+.2f}"])
    return rows


def theorem_rows(study: Study) -> list[list[Any]]:
    rows = []
    for cell in study.cells:
        for bits, values in sorted(cell.theorem.items()):
            rows.append([cell.run, bits, fmt(values.get("theorem_noise_variance"), 8),
                         plus_minus(values.get("theorem_mc_increase"), values.get("theorem_mc_stderr"), 4),
                         fmt(values.get("theorem_gradient_norm_term"), 5),
                         plus_minus(values.get("theorem_hessian_term"), values.get("theorem_hessian_stderr"), 4)])
    return rows


MECHANISM_TEXT = (
    "Train measures use a class-stratified draw of training images without augmentation (the same images for every "
    "run, drawn and shuffled under the data's split seed, so that no batch of them is a few classes only); sharpness "
    "(mean loss increase under random weight perturbations of relative size rho) and the Hessian trace (Hutchinson) "
    "are taken on the full-precision function of each model's weights, the landscape Theorem 3.1 is about. A negative "
    "value says those weights are not at a minimum of the full-precision loss: expected at 2 bits, where the float "
    "weights behind the grid are far from the function that was trained. The Hessian trace depends on the weights' "
    "scale: a layer followed by BatchNorm computes the same function when its weights are multiplied by c, while its "
    "Hessian is divided by c^2, so runs whose weight norms differ (weight decay, quantizers, training length) compare "
    "as flatter or sharper without being so; sharpness, relative to each layer's norm, does not have this problem. The "
    "noise figure shows the mean square of each layer's weight quantization noise (one statistic for every method, the "
    "matched-noise control included) over the body layers only: the first and last layers, held at their own "
    "precision, are left out at every bits level."
)


def detection_rows(study: Study) -> list[list[Any]]:
    rows = []
    for cell in study.cells:
        if cell.metric != "map50" or CLEAN not in cell.scores:
            continue
        summary = detection_summary(cell.scores)
        rows.append([cell.model, cell.dataset, cell.method, cell.bits_label, cell.seed, fmt(summary.get("P")),
                     fmt(summary.get("mPC")), fmt(summary.get("rPC"))])
    return rows


def document(study: Study, table1: list[list[Any]], robustness_sections: list[str], sections: list[str],
             mechanism: str, detection: list[list[Any]], unpaired: list[CellResult], has_figures: bool) -> str:
    diverged = [c for c in study.cells if c.diverged_at is not None]
    seeds = sorted({c.seed for c in study.cells if c.seed is not None})
    lines = [
        f"# Study report: {study.name}",
        "",
        f"Study folder `{study.directory.name}`: {len(study.cells)} runs ({sum(bool(c.scores) for c in study.cells)} "
        f"evaluated), seeds {seeds}. Accuracies in percent on the clean test set and its corrupted copies (19 "
        "corruptions x 5 severities unless the study chose fewer). A delta is quantized minus FP32 in percentage "
        "points, each quantized run against the FP32 run of its seed; positive (green) means the quantized model is "
        "more accurate.",
        "",
        "**Uncertainty.** " + ("With several seeds each delta is the mean over seeds with a 95 % Student-t "
                               "interval." if len(seeds) > 1 else
                               "With one seed each delta carries a 95 % paired-bootstrap interval over test images "
                               f"({BOOTSTRAP_SAMPLES} resamples; the same images for both models): it covers "
                               "test-image sampling only, not training randomness."),
        "Deltas whose interval contains 0 are grey and italic in the figures: they are within noise.",
        "",
    ]
    if unpaired:
        lines += ["**Unpaired runs** (no FP32 run of the same seed; left out of every delta and interval): "
                  + ", ".join(f"{c.run} (seed {c.seed})" for c in unpaired), ""]
    lines += [
        "## Table 1: accuracy under corruption and relative error improvement (Eq. 5)",
        "",
        "Eq. 5 is `100 * log10((100 - fp) / (100 - q))` on the mean accuracy over the corrupted test sets; "
        "positive means fewer errors than FP32. The last column is the epoch of minimum validation loss "
        "(the overfitting onset of Figure 1).",
        "",
        table(TABLE1_HEADER, table1),
        "",
    ]
    if diverged:
        lines += ["**Diverged runs:** " + ", ".join(f"{c.run} (step {int(c.diverged_at)})" for c in diverged), ""]
    collapsed = [c for c in study.cells if c.collapsed]
    if collapsed:
        lines += ["**Collapsed runs** (a dead model: clean accuracy at chance level, or a quantized layer whose "
                  "weights sit on one level; left out of every delta, Eq. 5 and robustness measure, like a diverged "
                  "run): " + "; ".join(f"{c.run} ({c.collapse_note})" for c in collapsed), ""]
    if robustness_sections:
        lines += ["## Robustness measures side by side", "", *robustness_sections]
    if detection:
        lines += ["## Detection robustness", "", "P = clean mAP50, mPC = mean mAP50 over the 15 benchmark "
                  "corruptions x 5 severities, rPC = mPC / P (%).", "",
                  table(["model", "dataset", "method", "precision", "seed", "P", "mPC", "rPC %"], detection), ""]
    lines += ["## Figure 2: per-corruption deltas, Figure 1: validation loss, accuracy against severity", "",
              *sections, "", mechanism, ""]
    files = ["`table1.csv`", "`robustness.csv`", "`deltas.csv` (every delta with its interval)"]
    lines += ["Files: " + ", ".join(files + (["`figures/`"] if has_figures else [])) + "."]
    return "\n".join(lines) + "\n"
