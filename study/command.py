"""The study commands: `cli.py study` (run a grid, here or as a SLURM job array), `cli.py report` (write a
study's report) and `cli.py theorem` (check Theorem 3.1 on FP32 runs)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from records.exits import EXIT_CELLS_FAILED
from study.grid import MethodEntry, StudyConfig, StudyError
from study.layout import ENTRY_POINT

# The entry point's failure with its own line and exit status (app.errors.CommandFailed), given by the caller:
# the study floor does not import the entry point's.
Fail = Callable[[int, str], Exception]


def study(args: list[str], parser, resolve_fit_config: Callable[[list[str]], dict[str, Any]], fail: Fail) -> None:
    """Run a study's grid (FP32 + methods x bits x seeds), resumably, then write its report."""
    from jsonargparse import ActionConfigFile

    from study.report import write_report
    from study.runner import StudyRunner, interruption, print_outcomes
    from study.slurm import write_slurm_scripts

    parser.add_argument("--config", action=ActionConfigFile, help="the study file, e.g. configs/study/demo.yaml")
    parser.add_class_arguments(StudyConfig, as_positional=False)
    parser.add_argument("--executor", default="local", choices=["local", "slurm"],
                        help="local: run the cells here, one after another; slurm: write a job-array script")
    parser.add_argument("--cell", type=int | None, default=None, help="run only this cell (0-based; job arrays)")
    parser.add_argument("--slurm_options", type=list[str], default=[],
                        help='#SBATCH lines for every job, e.g. ["--gres=gpu:1", "--time=12:00:00"]')
    parser.add_argument("--report", type=bool, default=True, help="write the report when the study ends")
    parser.add_argument("--force", type=bool, default=False,
                        help="retrain the cells whose config changed since they ran (their old folders and rows are "
                             "moved to <study>/superseded/); without it such a study is refused")
    config = parser.parse_args(args)
    files = config.get("config") or []
    study_file = Path(str(files[-1].absolute)) if files else None
    grid = _as_dataclasses(StudyConfig(**{k: config[k] for k in ("name", "base", "methods", "seeds", "args",
                                                                  "output_dir", "corruption_workers")}))
    runner = StudyRunner(grid, study_file, resolve_fit_config)
    if config.executor == "slurm":
        if study_file is None:
            raise StudyError("--executor slurm needs the study as a file: --config configs/study/<name>.yaml")
        runner.check(grid.cells(), config.force)  # before writing
        submit = write_slurm_scripts(grid, study_file, config.slurm_options, force=config.force)
        print(f"wrote {submit.parent}/cells.sbatch ({len(grid.cells())} array tasks) and report.sbatch; "
              f"submit with: bash {submit}")
        return
    outcomes = runner.run(only=config.cell, force=config.force)
    print_outcomes(outcomes)
    stopped = interruption(outcomes, runner.stopped_by)
    if stopped is not None:
        status, what = stopped
        again = shlex.join([sys.executable, str(ENTRY_POINT), "study", *args])
        raise fail(status, f"study stopped: {what}; no further cell was started. Resume with: {again}")
    failed = [o for o in outcomes if o.status == "failed"]
    reportable = any(o.status in ("finished", "collapsed", "skipped", "diverged") for o in outcomes)
    if config.cell is None and config.report and (reportable or not failed):
        print(f"report: {write_report(runner.directory)}")
    if failed:
        listed = "; ".join(f"{o.cell.name} ({o.detail}; log {runner.cell_log(o.cell)})" for o in failed)
        raise fail(EXIT_CELLS_FAILED, f"{len(failed)} {'cell' if len(failed) == 1 else 'cells'} failed: {listed}; "
                                      "rerun the study to retry them")


def _as_dataclasses(grid: StudyConfig) -> StudyConfig:
    """jsonargparse hands nested dataclasses back as Namespaces when read from a file; normalise them."""
    grid.methods = [e if isinstance(e, MethodEntry) else MethodEntry(**dict(vars(e) if hasattr(e, "__dict__") else e))
                    for e in grid.methods]
    return grid


def report(args: list[str], parser) -> None:
    """Write the report of a study folder: figures, tables and report.md from its results store."""
    from study.report import write_report

    parser.add_argument("study_dir", help="the study folder (holding results.jsonl)")
    parser.add_argument("--wandb", type=bool, default=True, help="also log the report to W&B")
    config = parser.parse_args(args)
    print(f"wrote {write_report(config.study_dir, log_to_wandb=config.wandb)}")


def theorem(args: list[str], parser) -> None:
    """Check Theorem 3.1 on trained FP32 runs: measured E[L(w + delta)] - L(w) against its predictions.

    For each bits level, every layer's weights get Gaussian noise of the variance of b-bit quantization noise;
    the Monte-Carlo loss increase is printed next to Eq. 4's gradient-norm term and the second-order
    0.5 * sum_l sigma_l^2 tr(H_l), and all three are appended to the run's (or its study's) results store.
    """
    from study.theorem import check_runs

    parser.add_argument("path", help="a run folder (config.yaml + checkpoints/last.ckpt) or a study folder")
    parser.add_argument("--bits", type=list[int], default=[2, 4, 8])
    parser.add_argument("--images", type=int, default=256, help="training images the losses are measured on")
    parser.add_argument("--samples", type=int, default=64, help="Monte-Carlo noise draws per bits level")
    parser.add_argument("--hessian_samples", type=int, default=16, help="Hutchinson vectors")
    config = parser.parse_args(args)
    check_runs(Path(config.path), config.bits, config.images, config.samples, config.hessian_samples)
