"""The report from a fabricated results store: Eq. 5 / Table 1 values, deltas, intervals, figures, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import run_cli
from records.measures import error_improvement
from records.run_files import save_predictions
from records.splits import CORRUPTIONS as ALL_CORRUPTIONS
from records.store import append_rows
from study.report import write_report
from study.report.figures import FIGURE_ORDER, noise_by_bits
from study.report.loading import Study
from study.report.statistics import paired_bootstrap, t_interval

pytestmark = pytest.mark.unit  # no process, no Lightning fit (tests/conftest.py guards it)

CORRUPTIONS = list(ALL_CORRUPTIONS)


def test_figure_2_lays_out_the_clean_set_and_every_corruption_once():
    assert [c for row in FIGURE_ORDER for c in row] == ["clean", *sorted(ALL_CORRUPTIONS)]
    assert [len(row) for row in FIGURE_ORDER] == [5, 5, 5, 5]


@pytest.mark.parametrize(("q", "expected"), [(79.17, -8.32), (83.94, 2.98), (84.07, 3.33)])
def test_eq5_reproduces_the_papers_table1(q, expected):
    assert error_improvement(82.80, q) == pytest.approx(expected, abs=0.005)


def rows_for(run, method, bits, seed, clean, corrupted_by_name, metric="accuracy"):
    identity = dict(run=run, study="fab", model="resnet20", dataset="cifar10", method=method,
                    weight_bits=bits if method != "fp32" else 32, act_bits=bits if method != "fp32" else 32, seed=seed,
                    epoch=None, step=None)
    rows = [{**identity, "split": "test", "corruption": "clean", "severity": 0, "metric": metric, "value": clean}]
    for name, values in corrupted_by_name.items():
        for severity, value in enumerate(values, start=1):
            rows.append({**identity, "split": "test", "corruption": name, "severity": severity, "metric": metric,
                         "value": value})
    return rows


def fabricate(study_dir, fp_mean, q_means, seeds=(0,)):
    """FP32 and LSQ runs whose mean corrupted accuracies are exactly fp_mean and q_means[bits]."""
    rows = []
    for seed in seeds:
        rows += rows_for(f"fp32-seed{seed}", "fp32", 32, seed, 92.0, {c: [fp_mean] * 5 for c in CORRUPTIONS})
        for bits, q_mean in q_means.items():
            rows += rows_for(f"lsq-w{bits}a{bits}-seed{seed}", "lsq", bits, seed, 92.0 + bits / 10,
                             {c: [q_mean] * 5 for c in CORRUPTIONS})
    append_rows(study_dir / "results.jsonl", rows)


def test_table1_has_the_papers_numbers_from_a_fabricated_store(tmp_path):
    fabricate(tmp_path, 82.80, {2: 79.17, 4: 83.94, 8: 84.07})
    report = write_report(tmp_path, log_to_wandb=False)
    with open(tmp_path / "report" / "table1.csv") as handle:
        table = {row["precision"]: row for row in csv.DictReader(handle)}
    assert table["FP32"]["avg corrupted acc"] == "82.80" and table["FP32"]["Eq. 5 error improvement"] == "0.00"
    assert [table[p]["Eq. 5 error improvement"] for p in ("W2A2", "W4A4", "W8A8")] == ["-8.32", "2.98", "3.33"]
    assert table["W4A4"]["clean delta"] == "+0.40"
    text = report.read_text()
    assert "| resnet20 | cifar10 | lsq | W8A8 |" in text and "figures/deltas_resnet20_cifar10_lsq.png" in text
    assert (tmp_path / "report" / "figures" / "deltas_resnet20_cifar10_lsq.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "figures" / "val_loss_resnet20_cifar10_lsq.png").exists()
    with open(tmp_path / "report" / "deltas.csv") as handle:
        deltas = [row for row in csv.DictReader(handle) if row["precision"] == "W2A2" and row["split"] == "fog"]
    assert float(deltas[0]["delta"]) == pytest.approx(79.17 - 82.80, abs=1e-3)


def test_several_seeds_give_t_intervals(tmp_path):
    rows = []
    for seed, shift in zip((0, 1, 2), (0.0, 1.0, 2.0), strict=True):
        rows += rows_for(f"fp32-seed{seed}", "fp32", 32, seed, 90.0, {c: [80.0] * 5 for c in CORRUPTIONS})
        rows += rows_for(f"lsq-w4a4-seed{seed}", "lsq", 4, seed, 90.0, {c: [80.0 + shift] * 5 for c in CORRUPTIONS})
    append_rows(tmp_path / "results.jsonl", rows)
    write_report(tmp_path, log_to_wandb=False)
    with open(tmp_path / "report" / "deltas.csv") as handle:
        fog = next(row for row in csv.DictReader(handle) if row["split"] == "fog")
    mean, low, high = t_interval([0.0, 1.0, 2.0])
    assert float(fog["delta"]) == pytest.approx(1.0) and mean == pytest.approx(1.0)
    assert float(fog["low"]) == pytest.approx(low, abs=1e-3) and float(fog["high"]) == pytest.approx(high, abs=1e-3)
    assert low == pytest.approx(1.0 - 4.303 * 1.0 / math.sqrt(3), abs=1e-3)  # t(0.975, 2) = 4.303


def test_one_seed_gets_a_paired_bootstrap_over_images(tmp_path):
    n = 400
    rng = np.random.default_rng(0)
    baseline = {"clean": rng.random(n) < 0.9}
    quantized = {"clean": baseline["clean"].copy()}
    for c in CORRUPTIONS:
        for s in range(1, 6):
            base = rng.random(n) < 0.7
            baseline[f"{c}/{s}"] = base
            # fog: the quantized model fixes 20 % of the baseline's errors; elsewhere identical predictions
            quantized[f"{c}/{s}"] = base | (rng.random(n) < 0.2) if c == "fog" else base.copy()
    rows = []
    for run, method, preds in (("fp32-seed0", "fp32", baseline), ("lsq-w4a4-seed0", "lsq", quantized)):
        scores = {c: [100 * preds[f"{c}/{s}"].mean() for s in range(1, 6)] for c in CORRUPTIONS}
        rows += rows_for(run, method, 4, 0, 100 * preds["clean"].mean(), scores)
        save_predictions(tmp_path / "cells" / run / "predictions.npz", preds)
    append_rows(tmp_path / "results.jsonl", rows)
    write_report(tmp_path, log_to_wandb=False)
    with open(tmp_path / "report" / "deltas.csv") as handle:
        deltas = {row["split"]: row for row in csv.DictReader(handle)}
    fog, snow = deltas["fog"], deltas["snow"]
    assert float(fog["low"]) > 0  # a real improvement: the interval excludes 0
    assert float(snow["delta"]) == 0 and float(snow["low"]) == 0 == float(snow["high"])  # identical predictions
    assert float(fog["low"]) < float(fog["delta"]) < float(fog["high"])


def test_paired_bootstrap_interval_covers_the_difference():
    rng = np.random.default_rng(1)
    baseline = rng.random((5, 2000)) < 0.6
    quantized = baseline.copy()
    quantized[:, :100] = True
    low, high = paired_bootstrap(quantized, baseline)
    true = 100 * (quantized.mean() - baseline.mean())
    assert low < true < high and high - low < 2.0


def test_validation_loss_onset_comes_from_the_metrics_files(tmp_path):
    fabricate(tmp_path, 80.0, {4: 81.0})
    for run, losses in (("fp32-seed0", [1.0, 0.5, 0.4, 0.6, 0.9]), ("lsq-w4a4-seed0", [1.0, 0.6, 0.5, 0.45, 0.44])):
        path = tmp_path / "cells" / run / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"epoch": e, "val/loss": v}) + "\n" for e, v in enumerate(losses)))
    write_report(tmp_path, log_to_wandb=False)
    with open(tmp_path / "report" / "table1.csv") as handle:
        onset = {row["precision"]: row["val-loss min epoch"] for row in csv.DictReader(handle)}
    assert onset == {"FP32": "2", "W4A4": "4"}


def test_diverged_cells_are_reported(tmp_path):
    fabricate(tmp_path, 80.0, {4: 81.0})
    append_rows(tmp_path / "results.jsonl", [dict(run="lsq-w2a2-seed0", study="fab", model="resnet20",
                                                  dataset="cifar10", method="lsq", weight_bits=2, act_bits=2, seed=0,
                                                  epoch=0, step=123, split="train", corruption="none",
                                                  severity=0, metric="diverged", value=123.0)])
    text = write_report(tmp_path, log_to_wandb=False).read_text()
    assert "diverged at step 123" in text and "lsq-w2a2-seed0 (step 123)" in text


def test_report_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert run_cli("report", str(tmp_path / "nowhere")) == 2
    (tmp_path / "empty").mkdir()
    assert run_cli("report", str(tmp_path / "empty")) == 2
    (tmp_path / "empty" / "results.jsonl").write_text("")
    assert run_cli("report", str(tmp_path / "empty")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 3 and all(line.startswith("qreg: error:") for line in errors)
    assert "no study folder" in errors[0] and "no results file" in errors[1] and "no results in" in errors[2]


def test_mechanism_section_from_train_theorem_and_noise_rows(tmp_path):
    fabricate(tmp_path, 80.0, {2: 78.0, 8: 81.0})
    extra = []
    for run, method, bits, train_acc in (("fp32-seed0", "fp32", 32, 99.0), ("lsq-w8a8-seed0", "lsq", 8, 97.0)):
        identity = dict(run=run, study="fab", model="resnet20", dataset="cifar10", method=method, weight_bits=bits,
                        act_bits=bits, seed=0, epoch=None, step=None,
                        split="train", corruption="none", severity=0)
        extra += [{**identity, "metric": "accuracy", "value": train_acc},
                  {**identity, "metric": "sharpness", "value": 0.25}, {**identity, "metric": "hessian_trace",
                                                                         "value": 40.0}]
    for bits, variance in ((2, 1e-3), (8, 4e-6)):
        identity = dict(run="fp32-seed0", study="fab", model="resnet20", dataset="cifar10", method="fp32",
                        weight_bits=bits, act_bits=32, seed=0, epoch=None, step=None,
                        split="train", corruption="none", severity=0)
        extra += [{**identity, "metric": "theorem_noise_variance", "value": variance},
                  {**identity, "metric": "theorem_mc_increase", "value": 0.5 * bits},
                  {**identity, "metric": "theorem_hessian_term", "value": 0.4 * bits}]
    append_rows(tmp_path / "results.jsonl", extra)
    for run, noise in (("lsq-w2a2-seed0", 1e-3), ("lsq-w8a8-seed0", 1e-5)):
        path = tmp_path / "cells" / run / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        bits = int(run.split("-w")[1][0])
        path.write_text(json.dumps({"epoch": 0, "val/loss": 1.0, "quant_noise/layer1.0.conv1": noise,
                                    "quant_noise/layer2.0.conv1": noise / 2, "quant_noise/mean": noise,
                                    "quant_noise/fc": 0.5, "quant_bits/fc": 8.0,  # the last layer, held at 8
                                    "quant_bits/layer1.0.conv1": bits, "quant_bits/layer2.0.conv1": bits}) + "\n")
    series = noise_by_bits(Study(tmp_path), ("resnet20", "cifar10"))
    assert series[("lsq", "layer1")] == {2: [1e-3], 8: [1e-5]} and series[("lsq", "layer2")] == {2: [5e-4], 8: [5e-6]}
    assert ("lsq", "fc") not in series  # the last layer, held at 8 bits, is left out at 8 bits too
    text = write_report(tmp_path, log_to_wandb=False).read_text()
    assert "| fp32 | FP32 | 0 |  | 92.00 | 99.00 | 7.00 |" in text  # gap = train - test accuracy
    assert "| lsq | W8A8 | 0 |  | 92.80 | 97.00 | 4.20 |" in text
    assert "| fp32-seed0 | 2 | 0.00100000 | 1 |" in text and "### Theorem 3.1" in text
    assert (tmp_path / "report" / "figures" / "noise_resnet20_cifar10.png").exists()
    assert (tmp_path / "report" / "figures" / "methods_resnet20_cifar10.png").exists()
    # the theorem rows did not change the FP32 run's identity (weight_bits 32 in Table 1)
    assert "| resnet20 | cifar10 | fp32 | FP32 | 1 | 92.00 |" in text
