"""The report's data: a study's results store and its cells' metric and prediction files, read through `records`
and checked, grouped the way the report needs them. Anything unreadable or contradictory ends the report with one
line naming the file (StudyError / RunFileError, exit status 2)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantizers import FLOAT_BITS, precision_label
from quantizers.methods import FP32
from records.measures import (
    CHANCE_METRIC,
    COLLAPSED_LAYERS_METRIC,
    COLLAPSED_METRIC,
    IMAGES_METRIC,
    SCORE_METRICS,
    mean_corrupted,
)
from records.run_files import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    RunFileError,
    check_predictions,
    load_predictions,
    read_epoch_metrics,
)
from records.splits import CLEAN, corruption_of, split_name
from records.store import RESULTS_FILE, ResultsStoreError, read_rows
from study.grid import StudyError
from study.layout import cell_dir


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
    epoch: int | None = None  # position of the weights tested (None in stores older than the field)
    step: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # split name -> accuracy (or mAP50), percent
    metric: str = "accuracy"
    diverged_at: float | None = None
    # A collapsed run (its model dead: chance-level clean accuracy or a layer on one level): its scores and train
    # measures are set aside here, so that nothing compares them; the report names it with why.
    collapsed: bool = False
    collapsed_layers: int = 0
    collapsed_scores: dict[str, float] = field(default_factory=dict)
    chance: float | None = None  # the largest class's share of the clean test set, percent
    images: int | None = None  # clean test images
    test_loss: float | None = None  # on the clean test set
    train: dict[str, float] = field(default_factory=dict)  # measures on training images (FlatnessCallback)
    theorem: dict[int, dict[str, float]] = field(default_factory=dict)  # bits -> theorem_* measures
    lines: dict[str, int] = field(default_factory=dict)  # split name -> the results.jsonl line of its score

    @property
    def measured(self) -> dict[str, float]:
        """The scores its test measured, whether compared (`scores`) or set aside as a collapsed run's: what its
        predictions.npz is checked against."""
        return self.collapsed_scores if self.collapsed else self.scores

    @property
    def experiment(self) -> tuple[str, str]:
        return self.model, self.dataset

    @property
    def is_baseline(self) -> bool:
        return self.method == FP32

    @property
    def bits_label(self) -> str:
        return precision_label(self.method, self.weight_bits, self.act_bits)

    @property
    def weights_at(self) -> str:
        """'epoch 11 / step 132': the weights the test measured (epoch 0-based, as Lightning counts)."""
        if self.epoch is None and self.step is None:
            return ""
        return f"{'' if self.epoch is None else self.epoch} / {'' if self.step is None else self.step}"

    @property
    def collapse_note(self) -> str:
        """'collapsed: clean 9.17 % (chance 10.03 %), 1 layer on one level'."""
        parts = []
        clean = self.collapsed_scores.get(CLEAN)
        if clean is not None:
            chance = f" (chance {self.chance:.2f} %)" if self.chance is not None else ""
            parts.append(f"clean {clean:.2f} %{chance}")
        if self.collapsed_layers:
            parts.append(f"{self.collapsed_layers} layer{'s' if self.collapsed_layers > 1 else ''} on one level")
        return "collapsed: " + ", ".join(parts) if parts else "collapsed"

    def per_corruption(self) -> dict[str, float]:
        """Clean score and, per corruption, the mean over its severities."""
        groups: dict[str, list[float]] = defaultdict(list)
        for split, value in self.scores.items():
            groups[corruption_of(split)].append(value)
        return {name: float(np.mean(values)) for name, values in groups.items()}

    def corrupted_mean(self, corruptions: tuple[str, ...] | None = None) -> float | None:
        return mean_corrupted(self.scores, corruptions)


def load_cells(study_dir: Path) -> tuple[list[CellResult], str | None]:
    """The study's cells and its name (the `study` column; None if the rows do not name one)."""
    path = study_dir / RESULTS_FILE
    try:
        rows = read_rows(path)
    except ResultsStoreError as error:
        raise StudyError(f"cannot report on {study_dir}: {error}") from None
    studies = sorted({r["study"] for r in rows if r["study"]})
    if len(studies) > 1:  # runs of the same name would replace each other's rows
        raise StudyError(f"{path} holds the rows of {len(studies)} studies, {', '.join(map(repr, studies))}: a report "
                         "never mixes studies; give each study its own folder and move the other study's rows out")
    with open(path, encoding="utf-8") as handle:  # the line of each row, as read_rows read them
        numbers = [number for number, line in enumerate(handle, start=1) if line.strip()]
    cells: dict[str, CellResult] = {}
    first: dict[str, int] = {}  # run -> the line of its first evaluation row
    # A run's identity comes from its evaluation rows; theorem rows reuse weight_bits for the simulated noise.
    is_primary = [r["metric"] in (*SCORE_METRICS, "diverged") for r in rows]
    ordered = [i for i, p in enumerate(is_primary) if p] + [i for i, p in enumerate(is_primary) if not p]
    for index in ordered:
        row, line = rows[index], numbers[index] if index < len(numbers) else 0
        identity = (row["model"], row["dataset"], row["method"], row["weight_bits"], row["act_bits"], row["seed"])
        cell = cells.setdefault(row["run"], CellResult(row["run"], *identity))
        first.setdefault(row["run"], line)
        if is_primary[index] and identity != (cell.model, cell.dataset, cell.method, cell.weight_bits, cell.act_bits,
                                              cell.seed):
            raise StudyError(f"{path}:{line}: run {row['run']}'s row describes another run ({_described(identity)}) "
                             f"than its row at line {first[row['run']]} ({_described(cell)}): fix or delete the "
                             "stale rows")
        split = split_name(row["corruption"], row["severity"])
        metric, value = row["metric"], row["value"]
        if metric == "diverged":
            cell.diverged_at = value
        elif metric == COLLAPSED_METRIC:
            cell.collapsed = True
        elif metric == COLLAPSED_LAYERS_METRIC:
            cell.collapsed_layers = int(value)
        elif metric == CHANCE_METRIC and split == CLEAN:
            cell.chance = value
        elif metric == IMAGES_METRIC and split == CLEAN:
            cell.images = int(value)
        elif metric.startswith("theorem_"):
            cell.theorem.setdefault(row["weight_bits"], {})[metric] = value
        elif row["split"] == "train":
            cell.train[metric] = value
        elif row["split"] != "test":  # a hand-edited row would otherwise be read as a test split
            raise StudyError(f"{path}:{line}: run {row['run']}'s row has split {row['split']!r}; a results row's split "
                             "is 'test' or 'train': fix or delete that line")
        elif metric in SCORE_METRICS:
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 100.0):
                raise StudyError(f"{path}: run {row['run']} has {metric} {value!r} on split {split}, not a percentage "
                                 "from 0 to 100; fix or delete those rows and rerun the cell's test")
            cell.metric = metric
            cell.scores[split] = value  # a re-evaluation overwrites: the latest row wins
            cell.lines[split] = line
            cell.epoch, cell.step = row["epoch"], row["step"]
        elif metric == "loss" and split == CLEAN:
            cell.test_loss = value
    for cell in cells.values():
        if cell.collapsed:  # out of every comparison, like a diverged run; its scores kept only to say why
            cell.collapsed_scores, cell.scores = cell.scores, {}
            cell.train, cell.theorem = {}, {}
    if not any(c.scores or c.diverged_at is not None or c.collapsed for c in cells.values()):
        raise StudyError(f"no results in {path}: run the study's cells first (cli.py study --config ...)")
    return list(cells.values()), (studies[0] if studies else None)


def _described(identity) -> str:
    if isinstance(identity, CellResult):
        identity = (identity.model, identity.dataset, identity.method, identity.weight_bits, identity.act_bits,
                    identity.seed)
    model, dataset, method, weight_bits, act_bits, seed = identity
    return f"{model} on {dataset}, {method} w{weight_bits}a{act_bits}, seed {seed}"


class Study:
    """A study's cells, grouped the way the report needs them, and their files read once each."""

    def __init__(self, study_dir: Path) -> None:
        self.directory = study_dir
        self.cells, study_name = load_cells(study_dir)
        self.name = study_name or study_dir.name
        self._predictions: dict[str, dict[str, np.ndarray] | None] = {}
        self._epochs: dict[str, list[dict]] = {}

    def experiments(self) -> list[tuple[str, str]]:
        return sorted({c.experiment for c in self.cells})

    def baselines(self, experiment) -> list[CellResult]:
        return [c for c in self.cells if c.experiment == experiment and c.is_baseline and c.scores]

    def methods(self, experiment) -> list[str]:
        return sorted({c.method for c in self.cells if c.experiment == experiment and not c.is_baseline})

    def levels(self, experiment, method) -> dict[str, list[CellResult]]:
        """bits label -> cells (one per seed), sorted by weight bits."""
        found: dict[str, list[CellResult]] = defaultdict(list)
        cells = sorted((c for c in self.cells if c.experiment == experiment and c.method == method),
                       key=lambda c: (c.weight_bits, c.act_bits if c.act_bits is not None else FLOAT_BITS))
        for c in cells:
            found[c.bits_label].append(c)
        return dict(found)

    def predictions(self, cell: CellResult) -> dict[str, np.ndarray] | None:
        """The cell's per-image correctness, checked against its rows; None if it has no predictions file."""
        if cell.run not in self._predictions:
            path = cell_dir(self.directory, cell.run) / PREDICTIONS_FILE
            predictions = None
            if path.exists():
                predictions = load_predictions(path)  # an unreadable file is that file's problem
                try:
                    check_predictions(path, predictions, cell.measured)
                except RunFileError:
                    if len({len(v) for v in predictions.values()}) > 1:
                        raise  # the file contradicts itself
                    # An intact predictions file (written with its rows, in one test) that the rows contradict: the
                    # rows changed after the test (a line edited, added or lost), not the file.
                    raise StudyError(self._store_problem(cell, path, predictions)) from None
            self._predictions[cell.run] = predictions
        return self._predictions[cell.run]

    def _store_problem(self, cell: CellResult, path: Path, predictions: dict[str, np.ndarray]) -> str:
        store = self.directory / RESULTS_FILE
        extra = [split for split in cell.measured if split not in predictions]
        if extra:
            return (f"{store}:{cell.lines[extra[0]]}: run {cell.run} has a row ({cell.metric}) for split {extra[0]}, "
                    f"which its test did not measure ({path}, intact, holds its {len(predictions)} splits): fix or "
                    "delete that line")
        for split, correct in predictions.items():
            accuracy = 100.0 * float(np.mean(correct)) if len(correct) else float("nan")
            if split in cell.measured and not abs(accuracy - cell.measured[split]) <= 0.01:
                return (f"{store}:{cell.lines[split]}: run {cell.run}'s {cell.metric} on split {split} is "
                        f"{cell.measured[split]:.2f}, but its test gave {accuracy:.2f} ({path}, intact): fix or delete "
                        "that line (a run's last row of a split wins), or rerun the cell's test")
        missing = [split for split in predictions if split not in cell.measured]
        return (f"{store} lacks run {cell.run}'s {cell.metric} rows for {len(missing)} splits its test measured "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; {path}, intact, holds them): restore "
                "those lines, or rerun the cell's test")

    def epochs(self, cell: CellResult) -> list[dict]:
        """The cell's metrics.jsonl rows, one per epoch ([] without the file)."""
        if cell.run not in self._epochs:
            path = cell_dir(self.directory, cell.run) / METRICS_FILE
            self._epochs[cell.run] = read_epoch_metrics(path) if path.exists() else []
        return self._epochs[cell.run]
