"""Where a study keeps what: the one place its folder layout is spelled.

    <study>/                       StudyConfig.output_dir, default runs/study-<name>/
        study.json                 which study the folder belongs to
        results.jsonl              every cell's rows (records.store.RESULTS_FILE)
        cells/<cell>/              one run folder per cell: config.yaml, checkpoints/, metrics.jsonl, predictions.npz,
                                   .cell.lock (held while the cell runs), cell.json (its config digest),
                                   cell.log (its output, appended run after run)
        corruptions/               the corrupted test splits, generated once and shared by all cells
        evaluations/<cell>-<ckpt>-<time>/   a later `test` of a cell's checkpoint (never written into the cell)
        superseded/<cell>-<time>/  a retrained cell's old folder and rows (`study --force`)
        slurm/                     cells.sbatch, report.sbatch, submit.sh and the jobs' output
        report/                    report.md, its figures and tables
"""

from __future__ import annotations

from pathlib import Path

RUNS_DIR = Path("runs")  # where a study (and a run) goes unless told otherwise
STUDY_FILE = "study.json"
CELLS = "cells"
CELL_LOCK = ".cell.lock"
CELL_FILE = "cell.json"
CELL_LOG = "cell.log"
CORRUPTIONS = "corruptions"
EVALUATIONS = "evaluations"
SUPERSEDED = "superseded"
SLURM = "slurm"
REPORT = "report"
# the entry point every generated command line calls (the study runner's cells, the SLURM scripts)
ENTRY_POINT = Path(__file__).resolve().parents[1] / "cli.py"


def default_study_dir(name: str) -> Path:
    return RUNS_DIR / f"study-{name}"


def cell_dir(study_dir: Path, cell: str) -> Path:
    return Path(study_dir) / CELLS / cell


def is_study_cell(folder: Path) -> bool:
    """A study's cell folder (`<study>/cells/<cell>/`, holding the runner's lock file)."""
    folder = Path(folder)
    return folder.parent.name == CELLS and (folder / CELL_LOCK).exists()


def study_of_cell(cell_folder: Path) -> Path:
    return Path(cell_folder).parent.parent


def evaluation_dir(cell_folder: Path, checkpoint_stem: str, stamp: str) -> Path:
    """A later evaluation of a cell's checkpoint: beside the cells, so that the cell's records stay the ones its
    fit wrote (the report reads them)."""
    cell_folder = Path(cell_folder)
    return study_of_cell(cell_folder) / EVALUATIONS / f"{cell_folder.name}-{checkpoint_stem}-{stamp}"
