"""The SLURM templates and the run folder a requeued job comes back to."""

from __future__ import annotations

import re

from cli import _default_run_dir
from conftest import REPO


def sbatch_options(path) -> dict[str, str]:
    options = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?", line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


def test_multigpu_template_launches_ddp_with_srun_and_requeues_on_sigusr1():
    script = REPO / "scripts" / "slurm" / "fit_multigpu.sbatch"
    options = sbatch_options(script)
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options
    assert options["ntasks-per-node"] == options["gres"].rsplit(":", 1)[1]  # one task per GPU
    text = script.read_text()
    srun = text[text.index("srun "):]
    assert "cli.py fit" in srun and '--trainer.devices "$SLURM_NTASKS_PER_NODE"' in srun
    assert '--trainer.num_nodes "$SLURM_NNODES"' in srun and "--trainer.strategy ddp" in srun


def test_study_array_template_runs_one_cell_per_task():
    text = (REPO / "scripts" / "slurm" / "study_array.sbatch").read_text()
    assert 'cli.py study --config "$STUDY" --cell "$SLURM_ARRAY_TASK_ID"' in text
    assert sbatch_options(REPO / "scripts" / "slurm" / "study_array.sbatch")["signal"] == "SIGUSR1@90"


def test_a_requeued_job_keeps_its_run_folder(monkeypatch):
    config = {"config": ["configs/resnet20_cifar10_lsq4.yaml"], "ckpt_path": None}
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    first = _default_run_dir(config, "fit")
    assert first == _default_run_dir(config, "fit") == "runs/resnet20_cifar10_lsq4-slurm4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert _default_run_dir(config, "fit") == "runs/resnet20_cifar10_lsq4-slurm77_3"
