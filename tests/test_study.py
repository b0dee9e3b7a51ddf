"""Studies: grid expansion, the SLURM script, bad input, and a study killed mid-cell that resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from records.store import read_rows
from study.grid import Cell, MethodEntry, StudyConfig, StudyError


def test_grid_expands_fp32_plus_methods_times_bits_times_seeds():
    study = StudyConfig(name="s", base=["x.yaml"], seeds=[0, 1], methods=[
        MethodEntry("fp32"), MethodEntry("lsq", [2, 4, 8]), MethodEntry("pact_dorefa", [4]), MethodEntry("dorefa", [2]),
    ])
    cells = study.cells()
    assert len(cells) == (1 + 3 + 1 + 1) * 2
    names = [c.name for c in cells]
    assert names[:4] == ["fp32-seed0", "fp32-seed1", "lsq-w2a2-seed0", "lsq-w2a2-seed1"]
    assert "pact_dorefa-w4a4-seed1" in names and "dorefa-w2-seed0" in names  # dorefa: weights only
    assert Cell("lsq", 4, 8, 0).quantization_args() == [
        "--quantization.method", "lsq", "--quantization.weight_bits", "4", "--quantization.act_bits", "8"]


@pytest.mark.parametrize(
    ("methods", "seeds", "message"),
    [
        ([MethodEntry("lsqq", [4])], [0], "unknown method 'lsqq'"),
        ([], [0], "empty grid"),
        ([MethodEntry("fp32"), MethodEntry("lsq", [9])], [0], "from 2 to 8, got 9"),
        ([MethodEntry("fp32"), MethodEntry("lsq")], [0], "needs bits"),
        ([MethodEntry("lsq", [4])], [0], "no fp32 baseline"),
        ([MethodEntry("fp32"), MethodEntry("lsq", [4, 4])], [0], "twice"),
        ([MethodEntry("fp32")], [], "no seeds"),
    ],
)
def test_bad_grids_are_refused_before_anything_runs(methods, seeds, message):
    with pytest.raises(StudyError, match=message):
        StudyConfig(name="s", base=["x.yaml"], methods=methods, seeds=seeds).cells()


def write_study(folder: Path, methods: str, extra_args: str = "") -> Path:
    study = folder / "study.yaml"
    study.write_text(f"""name: tiny
base: [{REPO / 'configs' / 'digits_resnet20_fp32.yaml'}]
methods: {methods}
seeds: [0]
output_dir: {folder / 'out'}
corruption_workers: 1
args: ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
       "--data.init_args.corrupted_test.corruptions", "[fog]", "--data.init_args.corrupted_test.severities", "[3]",
       "--flatness.enabled", "false"{extra_args}]
""")
    return study


@pytest.mark.parametrize(
    ("methods", "message"),
    [("[{method: fp32}, {method: lsqq, bits: [4]}]", "unknown method 'lsqq'"),
     ("[]", "empty grid")],
)
def test_study_cli_bad_grid_is_one_line_exit_2(methods, message, tmp_path, capsys):
    study = write_study(tmp_path, methods)
    assert run_cli("study", "--config", str(study)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("qreg: error:") and message in err[0]
    assert not (tmp_path / "out" / "cells").exists()


def test_slurm_executor_writes_a_job_array(tmp_path, capsys):
    study = write_study(tmp_path, "[{method: fp32}, {method: lsq, bits: [2, 4]}]")
    assert run_cli("study", "--config", str(study), "--executor", "slurm",
                   "--slurm_options", '["--gres=gpu:1", "--time=02:00:00"]') == 0
    folder = tmp_path / "out" / "slurm"
    script = (folder / "cells.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH --signal=SIGUSR1@90" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "cli.py study --config" in srun and srun.endswith("--cell ${SLURM_ARRAY_TASK_ID}")
    for i, cell in enumerate(["fp32-seed0", "lsq-w2a2-seed0", "lsq-w4a4-seed0"]):
        assert f"#   {i}: {cell} -> {tmp_path / 'out' / 'cells' / cell}" in script
    assert "cli.py report" in (folder / "report.sbatch").read_text()
    assert "--dependency=afterany:${cells}" in (folder / "submit.sh").read_text()
    assert not (tmp_path / "out" / "cells").exists()  # nothing ran


def test_study_killed_mid_cell_resumes_without_rerunning_or_duplicating(tmp_path, capsys, monkeypatch):
    """Kill the study (SIGKILL) while its second cell trains; restart it; every cell ends with one set of rows.

    The killed study is a process of its own; the restarts run in this one (their cells are processes still),
    which saves two interpreter start-ups."""
    study = write_study(tmp_path, "[{method: fp32}, {method: lsq, bits: [4]}]")
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    command = [sys.executable, "cli.py", "study", "--config", str(study), "--report", "false"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    second_cell = out / "cells" / "lsq-w4a4-seed0"
    deadline = time.time() + 600
    while time.time() < deadline and not (second_cell / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.2)
    assert (second_cell / "checkpoints" / "last.ckpt").exists(), "the second cell never saved a checkpoint"
    os.killpg(first.pid, signal.SIGKILL)  # the study and its cell, mid-training
    first.wait()
    rows = read_rows(out / "results.jsonl")
    assert {r["run"] for r in rows} == {"fp32-seed0"}  # the killed cell left no rows
    finished_first = (out / "cells" / "fp32-seed0" / "metrics.jsonl").read_text()

    capsys.readouterr()
    assert run_cli(*command[2:]) == 0
    printed = capsys.readouterr().out
    assert "resuming from its checkpoint" in printed
    assert "fp32-seed0" in printed and "skipped" in printed
    assert (out / "cells" / "fp32-seed0" / "metrics.jsonl").read_text() == finished_first  # not rerun
    rows = read_rows(out / "results.jsonl")
    keys = [(r["run"], r["split"], r["corruption"], r["severity"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing duplicated
    for run in ("fp32-seed0", "lsq-w4a4-seed0"):
        tested = {(c, s) for r, split, c, s, m in keys if r == run and split == "test" and m == "accuracy"}
        assert tested == {("clean", 0), ("fog", 3)}
    epochs = [line for line in (second_cell / "metrics.jsonl").read_text().splitlines() if line]
    assert len({__import__("json").loads(line)["epoch"] for line in epochs}) == 3

    assert run_cli(*command[2:]) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert len(read_rows(out / "results.jsonl")) == len(rows)
