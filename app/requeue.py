"""A requeued SLURM job's `fit` continues from its run folder's checkpoint.

SLURM restarts a requeued job with its original command, so a plain `fit` comes back without `--ckpt_path`.
Lightning would resume only its own `hpc_ckpt_*.ckpt` (which qreg no longer writes: a preemption saves `last.ckpt`
at a batch boundary, app/preemption.py) and, holding no `ckpt_path`, qreg's run-config saver refused the folder
its first run had written. Here the requeued fit names its checkpoint itself, the newest one that loads, and
goes through the same resume checks as `fit --ckpt_path`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app import run_folder
from callbacks.checkpoint_io import newest_loadable_checkpoint


def requeued_checkpoint(config: Any, subcommand: str) -> str | None:
    """The checkpoint a requeued `fit` without `--ckpt_path` resumes from, or None (not a requeue, no checkpoint).
    Damaged files are passed over, not renamed: every DDP rank must reach the same answer."""
    if subcommand != "fit" or config.get("ckpt_path") or not os.environ.get("SLURM_JOB_ID"):
        return None  # (outside SLURM default_run_dir would reserve a fresh folder)
    folder = Path(config.trainer.get("default_root_dir") or run_folder.default_run_dir(config, subcommand))
    if run_folder.continued_in_place(folder) not in ("SLURM requeue", "hpc checkpoint"):
        return None
    path = newest_loadable_checkpoint(folder)
    if path is not None:
        print(f"qreg: requeued SLURM job: resuming {folder} from {path}", flush=True)
    return None if path is None else str(path)
