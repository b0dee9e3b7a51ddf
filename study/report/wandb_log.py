"""The report mirrored to W&B: a run of the study's group (job type report), under the same online/offline rule
as training (records.wandb_mode). A W&B failure never fails the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from records.wandb_mode import wandb_mode, wandb_project


def log_report(study_dir: Path, study_name: str, header: list[str], table1: list[list[Any]],
               images: dict[str, Path]) -> None:
    try:
        import wandb

        mode = wandb_mode()
        if mode == "disabled":
            return
        run = wandb.init(project=wandb_project(), group=study_name, job_type="report",
                         name=f"{study_name}-report", dir=str(study_dir), mode=mode, reinit="finish_previous")
        run.log({"table1": wandb.Table(columns=header, data=[[str(x) for x in row] for row in table1]),
                 **{name: wandb.Image(str(path)) for name, path in images.items()}})
        run.finish()
    except Exception as error:  # noqa: BLE001 - W&B is a mirror of the report, never a reason to lose it
        print(f"qreg: W&B logging of the report skipped: {error}")
