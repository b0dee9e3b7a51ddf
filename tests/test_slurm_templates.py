"""The SLURM templates and the run folder a requeued job comes back to."""

from __future__ import annotations

import re

import pytest

from app.run_folder import default_run_dir
from conftest import REPO

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)


def sbatch_options(path) -> dict[str, str]:
    options = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?", line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


def test_fit_template_serves_cpus_and_gpus_requeues_on_sigusr1_and_appends_its_log():
    script = REPO / "scripts" / "slurm" / "fit.sbatch"
    options = sbatch_options(script)
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options and options["open-mode"] == "append"
    assert "gres" not in options and "gpus" not in options  # GPUs are the sbatch line's to ask for
    text = script.read_text()
    srun = text[text.index("srun "):]
    assert srun.startswith('srun "$PYTHON" cli.py fit') and "QREG_PYTHON" in text  # never `python` from PATH
    assert '--trainer.devices "$SLURM_NTASKS_PER_NODE"' in srun and '--trainer.num_nodes "$SLURM_NNODES"' in srun
    assert '--trainer.accelerator "$ACCELERATOR"' in srun and '--trainer.strategy "$STRATEGY"' in srun


def test_the_study_job_array_is_generated_only(tmp_path):
    """One source of truth for the array script: study/slurm.py (no static copy to drift from it)."""
    from study.grid import MethodEntry, StudyConfig
    from study.slurm import write_slurm_scripts

    assert not (REPO / "scripts" / "slurm" / "study_array.sbatch").exists()
    study = StudyConfig(name="t", base=["x.yaml"], methods=[MethodEntry(method="fp32")], seeds=[0, 1],
                        output_dir=str(tmp_path / "t"))
    submit = write_slurm_scripts(study, tmp_path / "t.yaml", ["--cpus-per-task=1"], python="/opt/venv/bin/python")
    cells = sbatch_options(submit.parent / "cells.sbatch")
    assert cells["array"] == "0-1" and cells["signal"] == "SIGUSR1@90" and "requeue" in cells
    assert cells["open-mode"] == "append"  # a requeued task appends to its log (fault 3 of issue 19)
    assert "srun /opt/venv/bin/python " in (submit.parent / "cells.sbatch").read_text()


def test_a_requeued_job_keeps_its_run_folder(monkeypatch):
    config = {"config": ["configs/resnet20_cifar10_lsq4.yaml"], "ckpt_path": None}
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    first = default_run_dir(config, "fit")
    assert first == default_run_dir(config, "fit") == "runs/resnet20_cifar10_lsq4-slurm4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert default_run_dir(config, "fit") == "runs/resnet20_cifar10_lsq4-slurm77_3"
