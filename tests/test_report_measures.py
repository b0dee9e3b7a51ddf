"""The report's robustness measures side by side (values computed by hand), pairing by seed, the severity figure,
an FP32-only study, and the files the report reads being broken (one line naming the file, exit status 2)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import run_cli
from records.measures import mean_corruption_error, relative_robustness
from records.run_files import save_predictions
from records.store import append_rows
from study.report import write_report
from study.report.figures import severity_curves
from study.report.loading import Study

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)

FP32_FOG, FP32_SNOW = [90.0, 85.0, 80.0, 75.0, 70.0], [80.0] * 5
LSQ_FOG, LSQ_SNOW = [92.0, 88.0, 84.0, 80.0, 76.0], [77.0] * 5


def rows(run, method, bits, seed, clean, by_corruption, epoch=None, step=None, study="hand"):
    identity = dict(run=run, study=study, model="resnet20", dataset="cifar10", method=method,
                    weight_bits=bits, act_bits=bits, seed=seed, epoch=epoch, step=step)
    found = [{**identity, "split": "test", "corruption": "clean", "severity": 0, "metric": "accuracy",
              "value": clean}]
    for corruption, values in by_corruption.items():
        found += [{**identity, "split": "test", "corruption": corruption, "severity": s, "metric": "accuracy",
                   "value": v} for s, v in enumerate(values, start=1)]
    return found


def hand_store(path, seeds=(0,)):
    found = []
    for seed in seeds:
        found += rows(f"fp32-seed{seed}", "fp32", 32, seed, 90.0, {"fog": FP32_FOG, "snow": FP32_SNOW}, 11, 132)
        found += rows(f"lsq-w4a4-seed{seed}", "lsq", 4, seed, 95.0, {"fog": LSQ_FOG, "snow": LSQ_SNOW}, 11, 132)
    append_rows(path / "results.jsonl", found)


def test_measures_by_hand():
    fp32 = {"clean": 90.0, **{f"fog/{s}": v for s, v in enumerate(FP32_FOG, 1)},
            **{f"snow/{s}": v for s, v in enumerate(FP32_SNOW, 1)}}
    lsq = {"clean": 95.0, **{f"fog/{s}": v for s, v in enumerate(LSQ_FOG, 1)},
           **{f"snow/{s}": v for s, v in enumerate(LSQ_SNOW, 1)}}
    # errors summed over severities: fog 80 vs 100, snow 115 vs 100 -> (0.80 + 1.15) / 2
    assert mean_corruption_error(lsq, fp32) == pytest.approx(97.5)
    assert mean_corruption_error(fp32, fp32) == pytest.approx(100.0)
    # mCE is over the 15 benchmark corruptions: spatter (one of the 4 extra) does not move it
    assert mean_corruption_error({**lsq, "spatter/1": 10.0}, {**fp32, "spatter/1": 90.0}) == pytest.approx(97.5)
    assert relative_robustness(fp32) == pytest.approx(100 * 80.0 / 90.0)
    assert relative_robustness(lsq) == pytest.approx(100 * 80.5 / 95.0)


def test_robustness_table_side_by_side_and_which_measures_agree(tmp_path):
    hand_store(tmp_path)
    text = write_report(tmp_path, log_to_wandb=False).read_text()
    with open(tmp_path / "report" / "robustness.csv") as handle:
        table = {row["run"]: row for row in csv.DictReader(handle)}
    lsq, fp32 = table["lsq-w4a4-seed0"], table["fp32-seed0"]
    assert lsq["mean corrupted"] == "80.50" and lsq["corrupted delta"] == "+0.50"
    assert lsq["relative robustness %"] == f"{100 * 80.5 / 95:.2f}" == "84.74"
    assert lsq["relative robustness delta"] == f"{100 * 80.5 / 95 - 100 * 80 / 90:+.2f}" == "-4.15"
    assert lsq["mCE % (FP32 = 100)"] == "97.50"
    assert lsq["Eq. 5"] == f"{100 * math.log10(20 / 19.5):+.2f}" == "+1.10"
    assert lsq["weights: epoch / step"] == "11 / 132" and fp32["mCE % (FP32 = 100)"] == "100.00"
    assert lsq["the measures say"] == "more robust: corrupted delta, mCE; less robust: relative robustness delta"
    assert "all measures agree for 0 of 1 quantized runs" in text
    assert "cover test-image sampling only, not training randomness" in text  # one seed
    assert "# Study report: hand" in text  # the study's name, not the folder's


def test_severity_figure(tmp_path):
    hand_store(tmp_path)
    curves = severity_curves(Study(tmp_path), ("resnet20", "cifar10"), "lsq")
    assert curves["FP32"] == pytest.approx({0: 90.0, 1: 85.0, 2: 82.5, 3: 80.0, 4: 77.5, 5: 75.0})
    assert curves["W4A4"] == pytest.approx({0: 95.0, 1: 84.5, 2: 82.5, 3: 80.5, 4: 78.5, 5: 76.5})
    text = write_report(tmp_path, log_to_wandb=False).read_text()
    figure = tmp_path / "report" / "figures" / "severity_resnet20_cifar10_lsq.png"
    assert figure.stat().st_size > 10_000 and "figures/severity_resnet20_cifar10_lsq.png" in text


def test_a_quantized_seed_without_its_fp32_run_is_unpaired(tmp_path):
    found = rows("fp32-seed0", "fp32", 32, 0, 90.0, {"fog": FP32_FOG})
    found += rows("lsq-w4a4-seed0", "lsq", 4, 0, 90.0, {"fog": [v + 1 for v in FP32_FOG]})
    found += rows("lsq-w4a4-seed1", "lsq", 4, 1, 90.0, {"fog": [v + 9 for v in FP32_FOG]})  # no fp32-seed1
    append_rows(tmp_path / "results.jsonl", found)
    text = write_report(tmp_path, log_to_wandb=False).read_text()
    assert "**Unpaired runs** (no FP32 run of the same seed" in text and "lsq-w4a4-seed1 (seed 1)" in text
    with open(tmp_path / "report" / "deltas.csv") as handle:
        fog = next(row for row in csv.DictReader(handle) if row["split"] == "fog")
    assert float(fog["delta"]) == pytest.approx(1.0)  # seed 0's pair only; seed 1 (+9) is in no delta


def test_the_bootstrap_interval_comes_from_the_pair_of_the_delta(tmp_path):
    """Seed 0 has no predictions file and no fog split; the fog delta is seed 1's, and so is its interval."""
    rng = np.random.default_rng(0)
    n = 400
    base = {"clean": rng.random(n) < 0.9, **{f"fog/{s}": rng.random(n) < 0.7 for s in range(1, 6)}}
    better = {name: v | (rng.random(n) < 0.2) if name != "clean" else v.copy() for name, v in base.items()}
    found = rows("fp32-seed0", "fp32", 32, 0, 90.0, {}) + rows("lsq-w4a4-seed0", "lsq", 4, 0, 91.0, {})
    for run, method, predictions in (("fp32-seed1", "fp32", base), ("lsq-w4a4-seed1", "lsq", better)):
        fog = [100 * predictions[f"fog/{s}"].mean() for s in range(1, 6)]
        found += rows(run, method, 4, 1, 100 * predictions["clean"].mean(), {"fog": fog})
        save_predictions(tmp_path / "cells" / run / "predictions.npz", predictions)
    append_rows(tmp_path / "results.jsonl", found)
    write_report(tmp_path, log_to_wandb=False)
    with open(tmp_path / "report" / "deltas.csv") as handle:
        fog = next(row for row in csv.DictReader(handle) if row["split"] == "fog")
    expected = 100 * np.mean([better[f"fog/{s}"].mean() - base[f"fog/{s}"].mean() for s in range(1, 6)])
    assert float(fog["delta"]) == pytest.approx(expected, abs=1e-3)
    assert 0 < float(fog["low"]) < float(fog["delta"]) < float(fog["high"])


def test_an_fp32_only_study_has_its_validation_loss_figure_and_no_dangling_folder(tmp_path):
    append_rows(tmp_path / "results.jsonl", rows("fp32-seed0", "fp32", 32, 0, 90.0, {"fog": FP32_FOG}))
    text = write_report(tmp_path, log_to_wandb=False).read_text()
    assert (tmp_path / "report" / "figures" / "val_loss_resnet20_cifar10_fp32.png").exists()
    assert "figures/val_loss_resnet20_cifar10_fp32.png" in text and "`figures/`" in text


def report_error(tmp_path, capsys) -> str:
    assert run_cli("report", str(tmp_path), "--wandb", "false") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("qreg: error:"), errors
    assert not (tmp_path / "report" / "report.md").exists()
    return errors[0]


@pytest.mark.parametrize("value", [math.nan, math.inf, 130.0])
def test_a_non_finite_or_impossible_accuracy_is_one_line(tmp_path, capsys, value):
    hand_store(tmp_path)
    append_rows(tmp_path / "results.jsonl", rows("lsq-w2a2-seed0", "lsq", 2, 0, value, {}))
    error = report_error(tmp_path, capsys)
    assert str(tmp_path / "results.jsonl") in error and "lsq-w2a2-seed0" in error


def test_a_cut_off_metrics_line_is_one_line(tmp_path, capsys):
    hand_store(tmp_path)
    path = tmp_path / "cells" / "fp32-seed0" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"epoch": 0, "val/loss": 1.0}) + "\n" + '{"epoch": 1, "val/lo')
    error = report_error(tmp_path, capsys)
    assert f"{path}:2" in error


def test_a_report_that_fails_on_a_damaged_file_leaves_the_previous_report_as_it_was(tmp_path, capsys):
    hand_store(tmp_path)
    write_report(tmp_path, log_to_wandb=False)
    before = {p: p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()}
    path = tmp_path / "cells" / "lsq-w4a4-seed0" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"epoch": 0, "val/lo')
    capsys.readouterr()
    assert run_cli("report", str(tmp_path), "--wandb", "false") == 2
    assert f"{path}:1" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()}
    assert after == before


def test_a_truncated_predictions_file_is_one_line(tmp_path, capsys):
    hand_store(tmp_path)
    path = tmp_path / "cells" / "fp32-seed0" / "predictions.npz"
    save_predictions(path, {"clean": np.ones(10, dtype=bool)})
    path.write_bytes(path.read_bytes()[:40])
    error = report_error(tmp_path, capsys)
    assert str(path) in error and "not a readable predictions file" in error


@pytest.mark.parametrize("case", ["split names", "sizes", "accuracy"])
def test_predictions_that_do_not_match_their_rows_are_one_line(tmp_path, capsys, case):
    append_rows(tmp_path / "results.jsonl", rows("fp32-seed0", "fp32", 32, 0, 50.0, {"fog": [50.0] * 5})
                + rows("lsq-w4a4-seed0", "lsq", 4, 0, 50.0, {"fog": [50.0] * 5}))
    half = np.arange(10) % 2 == 0  # 50 % correct
    good = {"clean": half, **{f"fog/{s}": half for s in range(1, 6)}}
    bad = {"split names": {"clean": half, **{f"snow/{s}": half for s in range(1, 6)}},
           "sizes": {**good, "fog/5": np.arange(12) % 2 == 0},
           "accuracy": {**good, "fog/2": np.ones(10, dtype=bool)}}[case]
    save_predictions(tmp_path / "cells" / "fp32-seed0" / "predictions.npz", good)
    path = tmp_path / "cells" / "lsq-w4a4-seed0" / "predictions.npz"
    save_predictions(path, bad)
    error = report_error(tmp_path, capsys)
    assert str(path) in error


def test_table1_eq5_uses_the_same_seed_pairs_as_the_delta(tmp_path):
    """FP32 seeds 0/1/2 at 80/82/84, LSQ only seed 0 at 81: against its own seed LSQ is +1 pp, so Eq. 5 must be
    positive too (averaging every FP32 seed, 82, would have made it negative)."""
    found = []
    for seed, fp in enumerate((80.0, 82.0, 84.0)):
        found += rows(f"fp32-seed{seed}", "fp32", 32, seed, 90.0, {"fog": [fp] * 5})
    found += rows("lsq-w4a4-seed0", "lsq", 4, 0, 90.0, {"fog": [81.0] * 5})
    append_rows(tmp_path / "results.jsonl", found)
    write_report(tmp_path, log_to_wandb=False)
    with open(tmp_path / "report" / "table1.csv") as handle:
        lsq = next(row for row in csv.DictReader(handle) if row["method"] == "lsq")
    assert lsq["corrupted delta [95% CI]"].startswith("+1.00")
    assert float(lsq["Eq. 5 error improvement"]) == pytest.approx(100 * math.log10(20 / 19), abs=0.005)
