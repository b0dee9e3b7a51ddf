"""A study cell is what its config says; a study folder holds one study; failures and bad rows are named right.

Finished cells are fabricated (a folder with the config.yaml its fit would write, rows in the store) wherever the
runner's decisions are what is tested; one test retrains a real, tiny cell (and checks that the config.yaml a real
fit writes is the one the runner resolves), and the failing cells are a stand-in script that fails at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from app.lightning_cli import resolve_fit_config
from conftest import REPO, run_cli
from records.run_files import save_predictions
from records.store import append_rows, read_rows
from study.grid import MethodEntry, StudyConfig
from study.identity import compared_config, digest
from study.layout import CELL_FILE, STUDY_FILE
from study.runner import StudyRunner

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.corrupted_test.severities", "[3]", "--flatness.enabled", "false"]
TWO_CELLS = [{"method": "fp32"}, {"method": "lsq", "bits": [4]}]


def write_study(folder: Path, corruption: str = "fog", extra: tuple[str, ...] = (), name: str = "tiny",
                methods: list | None = None, workers: int = 1) -> Path:
    study = folder / "study.yaml"
    args = [*TINY, "--data.init_args.corrupted_test.corruptions", f"[{corruption}]", *extra]
    study.write_text(yaml.safe_dump({
        "name": name, "base": [str(REPO / "configs" / "digits_resnet20_fp32.yaml")], "methods": methods or TWO_CELLS,
        "seeds": [0], "output_dir": str(folder / "out"), "corruption_workers": workers, "args": args}))
    return study


def runner_of(study_file: Path) -> StudyRunner:
    config = yaml.safe_load(study_file.read_text())
    config["methods"] = [MethodEntry(**m) for m in config["methods"]]
    return StudyRunner(StudyConfig(**config), study_file, resolve_fit_config)


def fabricate_finished(study_file: Path, names: tuple[str, ...] | None = None) -> StudyRunner:
    """Each cell as a finished fit of `study_file` leaves it: its config.yaml, and a clean-accuracy row."""
    runner = runner_of(study_file)
    for cell in runner.cells:
        if names is not None and cell.name not in names:
            continue
        folder = runner.cell_directory(cell)
        folder.mkdir(parents=True)
        (folder / ".cell.lock").touch()
        (folder / "config.yaml").write_text(yaml.safe_dump(resolve_fit_config(runner.command(cell)[3:]),
                                                           sort_keys=False))
        bits = cell.weight_bits or 32
        append_rows(runner.store, [dict(
            run=cell.name, study=runner.study.name, model="resnet20", dataset="digits", method=cell.method,
            weight_bits=bits, act_bits=bits, seed=cell.seed, epoch=0, step=2, split="test", corruption="clean",
            severity=0, metric="accuracy", value=50.0)])
    return runner


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qreg: error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    ("change", "key", "shown"),
    [({"corruption": "snow"}, "data.init_args.corrupted_test.corruptions", '["fog"] -> ["snow"]'),
     ({"extra": ("--model.init_args.model", "mobilenetv1")}, "model.init_args.model", "resnet20 -> mobilenetv1")],
    ids=["corruption", "model"],
)
def test_a_finished_study_whose_config_changed_is_refused(tmp_path, capsys, change, key, shown):
    fabricate_finished(write_study(tmp_path))
    before = files_under(tmp_path / "out")
    study = write_study(tmp_path, **change)
    capsys.readouterr()
    assert run_cli("study", "--config", str(study), "--report", "false") == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "2 cells" in line and "fp32-seed0 (finished), lsq-w4a4-seed0 (finished)" in line
    assert f"{key} {shown}" in line and "--force" in line and "output_dir" in line
    assert files_under(tmp_path / "out") == before  # store, folders: nothing written, nothing moved
    assert "started" not in captured.out


def test_unchanged_study_skips_finished_cells_and_output_options_do_not_count(tmp_path, capsys):
    fabricate_finished(write_study(tmp_path))
    store = (tmp_path / "out" / "results.jsonl").read_bytes()
    # where the corrupted splits are made and shown is not what a cell trains or tests
    study = write_study(tmp_path, workers=2, extra=("--trainer.log_every_n_steps", "1"))
    assert run_cli("study", "--config", str(study), "--report", "false") == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out.count("skipped") == 2
    assert (tmp_path / "out" / "results.jsonl").read_bytes() == store
    assert json.loads((tmp_path / "out" / STUDY_FILE).read_text()) == {"name": "tiny"}
    assert not (tmp_path / "out" / "superseded").exists()


def test_force_retrains_only_the_changed_cell_and_keeps_the_old_one_aside(tmp_path, capsys):
    """fp32 finished with the study's config; lsq-w4a4 finished with fog where the study now says brightness (quick
    to generate)."""
    old = fabricate_finished(write_study(tmp_path, corruption="fog"), names=("lsq-w4a4-seed0",))
    old_config = (old.cell_directory(old.cells[1]) / "config.yaml").read_bytes()
    study = write_study(tmp_path, corruption="brightness")
    fabricate_finished(study, names=("fp32-seed0",))
    fp32 = tmp_path / "out" / "cells" / "fp32-seed0"
    fp32_files = files_under(fp32)
    capsys.readouterr()
    assert run_cli("study", "--config", str(study), "--report", "false") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "1 cell in" in line and "lsq-w4a4-seed0 (finished)" in line and "fp32-seed0" not in line

    assert run_cli("study", "--config", str(study), "--report", "false", "--force", "true") == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out.count("skipped") == 1
    aside = list((tmp_path / "out" / "superseded").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("lsq-w4a4-seed0-")
    assert (aside[0] / "config.yaml").read_bytes() == old_config  # the old cell, whole, with its rows
    assert [r["run"] for r in read_rows(aside[0] / "results.jsonl")] == ["lsq-w4a4-seed0"]
    assert files_under(fp32) == fp32_files  # not rerun
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    lsq = [r for r in rows if r["run"] == "lsq-w4a4-seed0"]
    tested = {(r["corruption"], r["severity"]) for r in lsq if r["metric"] == "accuracy"}
    assert tested == {("clean", 0), ("brightness", 3)}
    assert all(r["value"] != 50.0 for r in lsq)  # the fabricated row left the store
    cell = tmp_path / "out" / "cells" / "lsq-w4a4-seed0"
    record = json.loads((cell / CELL_FILE).read_text())
    written = yaml.safe_load((cell / "config.yaml").read_text())  # by the real fit
    assert record["digest"] == digest(compared_config(written))  # what the runner resolved is what the fit ran
    assert "=== " in (cell / "cell.log").read_text()

    assert run_cli("study", "--config", str(study), "--report", "false") == 0  # unchanged now: both skipped
    assert capsys.readouterr().out.count("skipped") == 2


def test_another_study_pointed_at_the_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    fabricate_finished(write_study(tmp_path))
    before = files_under(tmp_path / "out")  # no study.json: the store's rows name the study
    other = write_study(tmp_path, name="other")
    assert run_cli("study", "--config", str(other), "--report", "false") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'tiny'" in line and "'other'" in line and "results.jsonl" in line and "output_dir" in line
    assert files_under(tmp_path / "out") == before

    (tmp_path / "out" / STUDY_FILE).write_text('{"name": "tiny"}\n')
    before = files_under(tmp_path / "out")
    assert run_cli("study", "--config", str(other), "--executor", "slurm") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'tiny'" in line and "'other'" in line and STUDY_FILE in line
    assert files_under(tmp_path / "out") == before  # no slurm scripts either


def test_report_refuses_a_store_of_two_studies(tmp_path, capsys):
    runner = fabricate_finished(write_study(tmp_path))
    rows = read_rows(runner.store)
    append_rows(runner.store, [{**rows[0], "study": "other", "value": 99.0}])
    before = files_under(tmp_path / "out")
    assert run_cli("report", str(tmp_path / "out"), "--wandb", "false") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'other'" in line and "'tiny'" in line and "results.jsonl" in line
    assert files_under(tmp_path / "out") == before and not (tmp_path / "out" / "report").exists()


def test_every_cell_failing_exits_1_naming_the_cells_and_their_logs(tmp_path, capfd, monkeypatch):
    """Both cells fail (a stand-in fit); fp32's folder held a run of another config with nothing to reuse (no rows,
    no checkpoint): it is moved aside without asking."""
    stale = fabricate_finished(write_study(tmp_path, corruption="snow"), names=("fp32-seed0",))
    stale.store.unlink()
    stale_config = (stale.cell_directory(stale.cells[0]) / "config.yaml").read_bytes()
    fake = tmp_path / "fails.py"
    fake.write_text("import sys\nprint('fake fit starting')\nprint('fake fit: out of luck', file=sys.stderr)\n"
                    "sys.exit(1)\n")
    monkeypatch.setattr("study.runner.ENTRY_POINT", fake)
    study = write_study(tmp_path)
    assert run_cli("study", "--config", str(study)) == 1
    captured = capfd.readouterr()
    aside = list((tmp_path / "out" / "superseded").iterdir())
    assert [p.name.startswith("fp32-seed0-") for p in aside] == [True] and f"moved to {aside[0]}" in captured.out
    assert (aside[0] / "config.yaml").read_bytes() == stale_config
    assert "Traceback" not in captured.err and "no results" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("qreg: 2 cells failed: fp32-seed0 (exit status 1; log ")
    assert "fake fit: out of luck" in captured.err  # the cell's output still reaches the terminal
    for cell in ("fp32-seed0", "lsq-w4a4-seed0"):
        log = tmp_path / "out" / "cells" / cell / "cell.log"
        assert str(log) in last
        text = log.read_text()
        assert "fake fit starting" in text and "fake fit: out of luck" in text and "exit status 1" in text
        assert json.loads((log.parent / CELL_FILE).read_text())["cell"] == cell
    assert not (tmp_path / "out" / "report").exists()


def test_a_bad_results_line_is_blamed_on_results_jsonl_not_on_intact_predictions(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for run, method, bits in (("fp32-seed0", "fp32", 32), ("lsq-w4a4-seed0", "lsq", 4)):
        correct = {"clean": rng.random(200) < 0.9, "fog/3": rng.random(200) < 0.7}
        save_predictions(tmp_path / "cells" / run / "predictions.npz", correct)
        for split, values in correct.items():
            corruption, _, severity = split.partition("/")
            rows.append(dict(run=run, study="s", model="resnet20", dataset="digits", method=method, weight_bits=bits,
                             act_bits=bits, seed=0, epoch=0, step=2, split="test", corruption=corruption,
                             severity=int(severity or 0), metric="accuracy", value=100.0 * float(values.mean())))
    append_rows(tmp_path / "results.jsonl", rows)
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    edited = json.loads(lines[1])
    edited["value"] = 12.5  # fp32's fog/3 accuracy, changed by hand
    lines[1] = json.dumps(edited) + "\n"
    (tmp_path / "results.jsonl").write_text("".join(lines))
    predictions = (tmp_path / "cells" / "fp32-seed0" / "predictions.npz").read_bytes()
    assert run_cli("report", str(tmp_path), "--wandb", "false") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'results.jsonl'}:2: run fp32-seed0's accuracy on split fog/3 is 12.50" in line
    assert "predictions.npz, intact" in line and "delete it" not in line
    assert (tmp_path / "cells" / "fp32-seed0" / "predictions.npz").read_bytes() == predictions


def test_a_checkpointed_cell_resumes_only_with_changes_a_resume_allows(tmp_path, capsys):
    """A killed cell whose model changed is refused before anything runs; a longer run is what resumes allow."""
    runner = fabricate_finished(write_study(tmp_path, methods=[{"method": "fp32"}]))
    (tmp_path / "out" / "results.jsonl").unlink()  # killed before its test: no rows, a checkpoint
    checkpoints = runner.cell_directory(runner.cells[0]) / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"not read by the check")
    study = write_study(tmp_path, methods=[{"method": "fp32"}], extra=("--model.init_args.model", "mobilenetv1"))
    assert run_cli("study", "--config", str(study), "--report", "false") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "fp32-seed0 (interrupted, with a checkpoint): model.init_args.model resnet20 -> mobilenetv1" in line
    longer = runner_of(write_study(tmp_path, methods=[{"method": "fp32"}], extra=("--trainer.max_epochs", "2")))
    longer.check(longer.cells)  # not refused: its fit resumes with max_epochs 2, recorded in resume-changes.yaml
    assert not longer.supersede_cells
