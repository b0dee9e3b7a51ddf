"""`cli.py report <study dir>`: the paper's artefacts from a study's results store and metric files only.

Writes `<study dir>/report/`: `report.md` (embedding the figures), PNG figures, CSV tables, and logs the same
to W&B (a W&B failure never fails the report).

- Figure 2 (per model/dataset/method): for each bits level a 4 x 5 grid of quantized-minus-FP32 accuracy
  deltas (percentage points) on the clean test set and the 19 corruptions (mean over severities), in the
  paper's Figure 3a order, on a diverging colour map centred on 0.
- Table 1: mean accuracy over the corrupted test sets and the relative error improvement of Eq. 5.
- Robustness measures side by side per run: mean corrupted accuracy and its delta, relative robustness and its
  delta, mCE against FP32, Eq. 5, and whether they agree in sign; accuracy against severity per bits level.
- Figure 1: validation loss per epoch of FP32 and each bits level, minimum marked (overfitting onset).
- Uncertainty the paper lacks (study/report/statistics.py).
- Detection studies: P (clean mAP50), mPC (mean over the 15 benchmark corruptions x 5 severities), rPC.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from quantizers import FLOAT_BITS, method_label, precision_label
from quantizers.methods import FP32
from records.measures import error_improvement
from records.splits import CLEAN
from records.store import write_atomically
from study.grid import StudyError
from study.layout import REPORT
from study.report import markdown
from study.report.figures import (
    FIGURE_ORDER,
    delta_figure,
    loss_figure,
    method_comparison_figure,
    min_loss_epoch,
    noise_figure,
    severity_curves,
    severity_figure,
)
from study.report.loading import CellResult, Study
from study.report.statistics import Delta, paired_delta, pairs, robustness_rows, unpaired
from study.report.wandb_log import log_report


def write_report(study_dir: str | Path, log_to_wandb: bool = True) -> Path:
    """Write `<study dir>/report/` and return the path of report.md."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StudyError(f"no study folder at {study_dir}")
    study = Study(study_dir)
    # Every file the report reads is read and checked before anything is written: a damaged one ends the
    # report with one line and leaves the previous report (figures included) as it was.
    for cell in study.cells:
        study.epochs(cell)
        study.predictions(cell)
    out = study_dir / REPORT
    figures = out / "figures"
    table1: list[list[Any]] = []
    delta_rows: list[list[Any]] = []
    robustness_csv: list[list[Any]] = []
    robustness_sections: list[str] = []
    sections: list[str] = []
    images: dict[str, Path] = {}
    seeds = len({c.seed for c in study.cells if c.seed is not None})

    def onset(cell: CellResult) -> int | None:
        return min_loss_epoch([study.epochs(cell)])

    for experiment in study.experiments():
        model, dataset = experiment
        baselines = study.baselines(experiment)
        if not baselines:
            sections.append(f"### {model} on {dataset}\n\nNo finished FP32 run: deltas cannot be computed.\n")
            continue
        fp_acc = markdown.mean_of([b.corrupted_mean() for b in baselines])
        curves_fp = [study.epochs(b) for b in baselines]
        table1.append([model, dataset, FP32, precision_label(FP32, FLOAT_BITS, FLOAT_BITS), len(baselines),
                       markdown.fmt(markdown.mean_of([b.scores.get(CLEAN) for b in baselines])), "",
                       markdown.fmt(fp_acc), "", "0.00", min_loss_epoch(curves_fp) or ""])
        rows = robustness_rows(study, experiment)
        robustness_csv += [[model, dataset, *markdown.robustness_row(r)] for r in rows]
        robustness_sections += [f"### {model} on {dataset}", "", *markdown.robustness_text(rows, seeds),
                                markdown.table(markdown.ROBUSTNESS_HEADER, [markdown.robustness_row(r) for r in rows]),
                                ""]
        section = [f"### {model} on {dataset}\n"]
        methods = study.methods(experiment)
        for method in methods:
            levels = study.levels(experiment, method)
            panels: dict[str, dict[str, Delta | None]] = {}
            curves = {"FP32": curves_fp}
            for bits, cells in levels.items():
                finished = [c for c in cells if c.scores]
                curves[bits] = [study.epochs(c) for c in finished]
                panels[bits] = {corruption: paired_delta(study, finished, baselines, corruption)
                                for row in FIGURE_ORDER for corruption in row} if finished else {}
                for corruption, found in panels[bits].items():
                    if found is not None:
                        delta_rows.append([model, dataset, method, bits, corruption, markdown.fmt(found.mean, 3),
                                           markdown.fmt(found.low, 3), markdown.fmt(found.high, 3)])
                table1.append(_table1_row(study, experiment, method, bits, cells, baselines,
                                          panels[bits].get(CLEAN), min_loss_epoch(curves[bits])))
            label = method_label(method)
            title = f"{model} on {dataset}, {label}: quantized - FP32 accuracy (pp)"
            name = f"deltas_{model}_{dataset}_{method}.png"
            delta_figure(title, panels, figures / name)
            loss_name = f"val_loss_{model}_{dataset}_{method}.png"
            loss_figure(f"{model} on {dataset}, {label}: validation loss", curves, figures / loss_name)
            images.update({name: figures / name, loss_name: figures / loss_name})
            section += [f"![{title}](figures/{name})\n", f"![validation loss](figures/{loss_name})\n"]
            severity_name = f"severity_{model}_{dataset}_{method}.png"
            if severity_figure(f"{model} on {dataset}, {label}: {baselines[0].metric} against severity",
                               severity_curves(study, experiment, method), figures / severity_name,
                               baselines[0].metric):
                images[severity_name] = figures / severity_name
                section.append(f"![accuracy against severity](figures/{severity_name})\n")
        if not methods:  # an FP32-only study (or one whose other cells have not finished) still has its curve
            loss_name = f"val_loss_{model}_{dataset}_fp32.png"
            loss_figure(f"{model} on {dataset}, FP32: validation loss", {"FP32": curves_fp}, figures / loss_name)
            images[loss_name] = figures / loss_name
            section.append(f"![validation loss](figures/{loss_name})\n")
        sections.append("\n".join(section))
    mechanism = _mechanism_section(study, figures, images, onset)
    out.mkdir(parents=True, exist_ok=True)
    markdown.write_csv(out / "table1.csv", markdown.TABLE1_HEADER, table1)
    markdown.write_csv(out / "robustness.csv", ["model", "dataset", *markdown.ROBUSTNESS_HEADER], robustness_csv)
    markdown.write_csv(out / "deltas.csv", ["model", "dataset", "method", "precision", "split", "delta", "low",
                                            "high"], delta_rows)
    report = markdown.document(study, table1, robustness_sections, sections, mechanism, markdown.detection_rows(study),
                               unpaired(study), has_figures=bool(images))
    write_atomically(out / "report.md", report.encode())
    if log_to_wandb:
        log_report(study_dir, study.name, markdown.TABLE1_HEADER, table1, images)
    return out / "report.md"


def _table1_row(study: Study, experiment, method: str, bits: str, cells: list[CellResult],
                baselines: list[CellResult], clean: Delta | None, onset: int | None) -> list[Any]:
    model, dataset = experiment
    finished = [c for c in cells if c.scores]
    if not finished:
        diverged = [c for c in cells if c.diverged_at is not None]
        collapsed = [c for c in cells if c.collapsed]
        note = (f"diverged at step {int(diverged[0].diverged_at)}" if diverged
                else collapsed[0].collapse_note if collapsed else "no results")
        return [model, dataset, method, bits, 0, note, "", "", "", "", ""]
    q_acc = markdown.mean_of([c.corrupted_mean() for c in finished])
    corrupted = paired_delta(study, finished, baselines, None)
    # Eq. 5 on the same seed pairs as the delta beside it: an unpaired run (its FP32 seed missing) would let
    # the two columns disagree in sign.
    paired = pairs(finished, baselines)
    improvement = error_improvement(markdown.mean_of([b.corrupted_mean() for _, b in paired]),
                                    markdown.mean_of([q.corrupted_mean() for q, _ in paired])) if paired else math.nan
    return [model, dataset, method, bits, len(finished),
            markdown.fmt(markdown.mean_of([c.scores.get(CLEAN) for c in finished])),
            "" if clean is None else f"{clean.mean:+.2f}", markdown.fmt(q_acc), markdown.with_interval(corrupted),
            markdown.fmt(improvement), onset if onset is not None else ""]


def _mechanism_section(study: Study, figures: Path, images: dict[str, Path], onset) -> str:
    lines = ["## Mechanism: generalization gap, flatness, quantization noise", "", markdown.MECHANISM_TEXT, ""]
    for experiment in study.experiments():
        model, dataset = experiment
        rows = markdown.generalization_table(study, experiment, onset)
        lines += [f"### {model} on {dataset}", "", markdown.table(markdown.GENERALIZATION_HEADER, rows), ""]
        name = f"methods_{model}_{dataset}.png"
        if method_comparison_figure(study, experiment, figures / name):
            images[name] = figures / name
            lines.append(f"![methods side by side](figures/{name})\n")
        name = f"noise_{model}_{dataset}.png"
        if noise_figure(study, experiment, figures / name):
            images[name] = figures / name
            lines.append(f"![quantization noise (mean square) against bits, body layers](figures/{name})\n")
    theorem = markdown.theorem_rows(study)
    if theorem:
        lines += ["### Theorem 3.1", "", "E[L(w + delta)] - L(w) measured by Monte Carlo with each layer's delta of "
                  "the variance of b-bit quantization noise, beside Eq. 4's gradient-norm term (derived for squared "
                  "error; on the first batch of the class-stratified, shuffled training images: per-sample "
                  "Jacobians are costly) and the second-order term 0.5 sum_l sigma_l^2 tr(H_l) (cross-entropy).", "",
                  markdown.table(["run", "bits", "mean sigma^2", "measured increase", "Eq. 4 term",
                                  "0.5 sum sigma^2 tr(H)"], theorem), ""]
    return "\n".join(lines)
