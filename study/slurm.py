"""`--executor slurm`: write a job array (one grid cell per task) and a report job that runs after it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from records.store import write_atomically
from study.grid import StudyConfig, StudyError
from study.layout import ENTRY_POINT, SLURM, cell_dir


def sbatch_value(text: str) -> str:
    """An #SBATCH option value in double quotes (sbatch strips them), so a path or name with spaces stays one
    value; characters sbatch cannot quote there are refused."""
    if any(c in text for c in '"\n\r'):
        raise StudyError(f"{text!r} cannot be written into an #SBATCH line (it holds a quote or a line break)")
    return f'"{text}"'


def write_slurm_scripts(
    study: StudyConfig, study_file: Path, sbatch_options: list[str], python: str | None = None, force: bool = False
) -> Path:
    """Write `<study>/slurm/{cells.sbatch, report.sbatch, submit.sh}`; returns submit.sh.

    Each array task runs `cli.py study --cell $SLURM_ARRAY_TASK_ID`, i.e. exactly one cell, in its own
    folder `<study>/cells/<cell>/`, resuming from that cell's last checkpoint if the task is requeued. Each task
    checks its cell's config as a local study does: refused when it changed, retrained with `force` (the scripts
    then pass --force).
    """
    cells = study.cells()
    directory = study.directory().resolve()
    folder = directory / SLURM
    python = python or sys.executable
    study_command = [python, str(ENTRY_POINT), "study", "--config", str(study_file.resolve()),
                     "--output_dir", str(directory), *(["--force", "true"] if force else [])]
    header = ["#!/bin/bash", f"#SBATCH --job-name={sbatch_value(f'qreg-{study.name}')}",
              *(f"#SBATCH {o}" for o in sbatch_options)]
    listing = "\n".join(f"#   {i}: {cell.name} -> {cell_dir(directory, cell.name)}" for i, cell in enumerate(cells))
    cells_script = "\n".join([
        *header,
        f"#SBATCH --array=0-{len(cells) - 1}",
        f"#SBATCH --output={sbatch_value(f'{folder}/cell-%a-%A.out')}",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",  # a requeued task appends to its log instead of truncating it
        f"# {len(cells)} cells, one per array task:",
        listing,
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        "srun " + shlex.join(study_command) + " --cell ${SLURM_ARRAY_TASK_ID}",
        "",
    ])
    report_script = "\n".join([
        *header,
        f"#SBATCH --output={sbatch_value(f'{folder}/report-%j.out')}",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        "srun " + shlex.join([python, str(ENTRY_POINT), "report", str(directory)]),
        "",
    ])
    submit = "\n".join([
        "#!/bin/bash",
        "# Submit the cells as a job array, then the report once every task has ended.",
        "set -euo pipefail",
        f"cells=$(sbatch --parsable {shlex.quote(str(folder / 'cells.sbatch'))})",
        f"sbatch --dependency=afterany:${{cells}} {shlex.quote(str(folder / 'report.sbatch'))}",
        "echo \"submitted study array ${cells}\"",
        "",
    ])
    for name, text in (("cells.sbatch", cells_script), ("report.sbatch", report_script), ("submit.sh", submit)):
        write_atomically(folder / name, text.encode())
        (folder / name).chmod(0o755)
    return folder / "submit.sh"
